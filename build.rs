//! Compiles `proto/` with protox (no system `protoc`) and generates the tonic
//! code from the descriptor set, which is also written to `OUT_DIR` for server
//! reflection (`compile_fds` ignores `file_descriptor_set_path`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/reassigned/v1/reassigned.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("reassigned_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, but a request that does not decode is
        // INVALID_ARGUMENT, not INTERNAL (src/api/codec.rs).
        .codec_path("crate::api::codec::ApiCodec")
        .compile_fds(fds)?;
    Ok(())
}
