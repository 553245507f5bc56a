//! Compiles the agent protocol with protox (pure Rust), so no machine needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["infermesh/v1/agent.proto"], ["."])?;
    // Credentials carry secrets: their Debug is written by hand (`<redacted>`).
    tonic_prost_build::configure()
        .skip_debug(["infermesh.v1.Credentials"])
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=infermesh/v1/agent.proto");
    Ok(())
}
