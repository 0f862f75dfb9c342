//! Compiles `proto/capvirt.proto` with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["capvirt.proto"], ["proto"])?;
    // The stubs use `codec::Codec` (tonic-prost's encoder, a slice-fed decoder): same bytes.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
