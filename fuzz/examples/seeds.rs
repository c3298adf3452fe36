//! Writes the seed corpora into `fuzz/seeds/<target>/`, made with kiln's own encoders so that
//! they stay in step with the formats:
//!
//!     cd fuzz && cargo run --example seeds
//!
//! Each seed starts with the mode byte its target reads first (see the targets' docs).

use std::fs;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use kiln_jails::linux::helper::Job;
use kiln_archive::{Manifest, Source};
use kiln_proto::content::chunks;
use kiln_proto::v1::{self, from_builder, from_client, to_builder, to_client};
use kiln_proto::{wire_digest, Digest, PROTOCOL_VERSION};
use prost::Message;

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    archives(&seeds.join("archive_unpack"));
    compiler_args(&seeds.join("compiler_args"));
    requests(&seeds.join("requests"));
    println!("seeds written to {}", seeds.display());
}

fn write(dir: &Path, name: &str, mode: Option<u8>, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    let mut out: Vec<u8> = mode.into_iter().collect();
    out.extend_from_slice(bytes);
    fs::write(dir.join(name), out).unwrap();
}

/// A toolchain-shaped archive: directories, files, an executable, relative symlinks.
fn archives(dir: &Path) {
    let host = tempfile::tempdir().unwrap();
    let cc = host.path().join("cc");
    let lib = host.path().join("libc.so");
    fs::write(&cc, b"#!/bin/sh\nexec true\n").unwrap();
    fs::write(&lib, vec![0x7f; 700]).unwrap();
    let mut m = Manifest::default();
    m.add("usr", Source::Dir);
    m.add("usr/bin", Source::Dir);
    let exec = |host: &Path, executable| Source::File {
        host: host.to_path_buf(),
        executable,
    };
    m.add("usr/bin/cc", exec(&cc, true));
    m.add("usr/bin/gcc", Source::Symlink("cc".into()));
    m.add("usr/lib/libc.so.6", exec(&lib, false));
    m.add("lib", Source::Symlink("usr/lib".into()));
    let mut packed = Vec::new();
    m.pack(&mut packed).unwrap();
    write(dir, "toolchain.tar.gz", Some(0), &packed);

    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&packed[..])
        .read_to_end(&mut tar)
        .unwrap();
    write(dir, "toolchain.tar", Some(1), &tar);

    // Links that stay inside one by one but not together (`unpack` once took them).
    let mut chained = tar::Builder::new(Vec::new());
    for (name, target) in [("s", "."), ("l", "s/..")] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        chained.append_link(&mut h, name, target).unwrap();
    }
    write(
        dir,
        "chained-links.tar",
        Some(1),
        &chained.into_inner().unwrap(),
    );
}

fn compiler_args(dir: &Path) {
    let commands = [
        "-c foo.c -o foo.o",
        "-c -O2 -g -Wall -Iinclude -I include2 -DNDEBUG -DX=1 src/foo.c -o obj/foo.o",
        "-c foo.cc -std=c++17 -fPIC -MD -MT foo.o -MF foo.o.d -o foo.o",
        "-c foo.c -Wp,-MD,.foo.o.d -gsplit-dwarf -fdebug-prefix-map=/src=. -o foo.o",
        "-S -x c foo.txt -isystem /opt/inc -iquote q -include pre.h -march=native",
        "-c foo.c -fprofile-use=prof -Wa,--noexecstack -Xclang -fcolor-diagnostics",
        "-c foo.S -MMD -MP -target x86_64-linux-gnu --sysroot=/sys",
    ];
    for (i, cmd) in commands.iter().enumerate() {
        let argv: Vec<&str> = cmd.split(' ').collect();
        write(dir, &format!("gcc-{i}"), None, argv.join("\0").as_bytes());
    }
    write(
        dir,
        "response-file",
        None,
        b"@-c 'a b.c' \"-DX=1 2\" -o out\\ file.o -O2\n",
    );
}

/// Messages as they follow each other on a stream: each with its length in front.
fn stream<M: Message>(msgs: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode_length_delimited(&mut out).unwrap();
    }
    out
}

fn requests(dir: &Path) {
    let source = Bytes::from_static(b"int main(void) { return 0; }\n");
    let digest = Digest::of(&source);
    let chunk = chunks(&digest, &source).next().unwrap();
    let spec = v1::JobSpec {
        protocol_version: PROTOCOL_VERSION,
        toolchain: Some(wire_digest(&Digest::of(b"toolchain"), 9)),
        os: "linux".into(),
        arch: "x86_64".into(),
        argv: ["/usr/bin/gcc", "-c", "/src/a.c", "-o", "/src/a.o"]
            .map(String::from)
            .into(),
        env: vec![v1::EnvVar {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        cwd: "/src".into(),
        inputs: vec![v1::InputFile {
            path: "/src/a.c".into(),
            digest: Some(wire_digest(&digest, source.len() as u64)),
            executable: false,
        }],
        dirs: vec!["/src/include".into()],
        outputs: vec!["/src/a.o".into()],
        timeout_ms: 60_000,
        label: "a.c".into(),
    };
    let from_client = |msg| v1::FromClient { msg: Some(msg) };
    let compile = stream(&[
        from_client(from_client::Msg::Spec(spec.clone())),
        from_client(from_client::Msg::Chunk(chunk.clone())),
    ]);
    write(dir, "compile", Some(0), &compile);

    let register = v1::Register {
        protocol_version: PROTOCOL_VERSION,
        name: "b1".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        slots: 2,
        toolchains: vec![wire_digest(&Digest::of(b"toolchain"), 9)],
        jail: "linux".into(),
    };
    let finished = v1::Finished {
        exit_code: 0,
        outputs: vec![v1::OutputFile {
            path: "/src/a.o".into(),
            digest: Some(wire_digest(&digest, source.len() as u64)),
        }],
        builder: "b1".into(),
        ..Default::default()
    };
    let job_chunk = v1::JobChunk {
        job_id: 1,
        chunk: Some(chunk.clone()),
    };
    let from_builder = |msg| v1::FromBuilder { msg: Some(msg) };
    let join = stream(&[
        from_builder(from_builder::Msg::Register(register)),
        from_builder(from_builder::Msg::Finished(v1::JobFinished {
            job_id: 1,
            finished: Some(finished.clone()),
        })),
        from_builder(from_builder::Msg::Chunk(job_chunk.clone())),
    ]);
    write(dir, "join", Some(1), &join);

    let to_builder = |msg| v1::ToBuilder { msg: Some(msg) };
    let start = stream(&[
        to_builder(to_builder::Msg::Start(v1::JobStart {
            job_id: 1,
            spec: Some(spec),
        })),
        to_builder(to_builder::Msg::Chunk(job_chunk)),
    ]);
    write(dir, "start", Some(2), &start);

    let to_client = |msg| v1::ToClient { msg: Some(msg) };
    let result = stream(&[
        to_client(to_client::Msg::Finished(finished)),
        to_client(to_client::Msg::Chunk(chunk)),
    ]);
    write(dir, "result", Some(3), &result);

    let job = Job {
        uid: 1000,
        gid: 1000,
        cwd: "/src".into(),
        timeout_ms: 60_000,
        memory: 1 << 30,
        processes: 256,
        file_size: 1 << 30,
        open_files: 1024,
        env: vec!["PATH=/usr/bin:/bin".into()],
        argv: vec!["/usr/bin/gcc".into(), "-c".into(), "/src/a.c".into()],
    };
    write(dir, "jail-job", Some(4), &job.to_words().unwrap());
}
