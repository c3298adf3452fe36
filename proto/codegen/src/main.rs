//! Writes the generated tonic/prost code for `kiln.v1` into `proto/src/gen/`, or into the
//! directory given as the one argument (CI generates into a scratch directory and compares it
//! with the committed code).

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => root.join("src/gen"),
    };
    std::fs::create_dir_all(&out).expect("creating the output directory");
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_transport(true)
        // Blob fields share the receive buffer instead of being copied into a Vec.
        .bytes(".")
        // Chunks carry file contents: their Debug is written by hand so bytes never reach logs.
        .skip_debug(["kiln.v1.Chunk"])
        // prost's codec, except that a message that does not decode is INVALID_ARGUMENT.
        .codec_path("crate::codec::Codec")
        .compile_protos(&[root.join("kiln/v1/kiln.proto")], &[root.clone()])
        .expect("protoc failed; install protobuf-compiler");
    println!("wrote {}", out.join("kiln.v1.rs").display());
}
