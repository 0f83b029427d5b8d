//! Compiles `proto/braid/v1/*.proto` with protox (pure Rust, so no `protoc` is
//! needed on the machine that builds braid, an ARM board included).

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not compiled in (`env!`): a build script binary
    // reused from another checkout must compile this checkout's protos.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let main_proto = proto_root.join("braid/v1/braid.proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let fds = protox::compile([&main_proto], [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("braid_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec, but a message that does not decode is InvalidArgument.
        .codec_path("crate::codec::BraidCodec")
        // Their Debug is written by hand, redacting the password and the value.
        .skip_debug(["braid.v1.RegistryCredential", "braid.v1.SecretValue"])
        .compile_fds(fds)?;
    Ok(())
}
