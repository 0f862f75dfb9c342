//! `capvirt`: a thin binary over the `capvirt_cli` library.

fn main() -> std::process::ExitCode {
    capvirt_cli::run(std::env::args_os().collect())
}
