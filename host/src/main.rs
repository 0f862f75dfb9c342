//! `capvirt`: a thin binary over the `capvirt_host` library.

fn main() -> std::process::ExitCode {
    capvirt_host::cli::run(std::env::args_os().collect())
}
