//! What a kiln server or client reads from its peer. The first byte picks the stream:
//!
//! - 0..=3: length-delimited `kiln.v1` messages as they arrive on a stream: `FromClient` (the
//!   scheduler's `Compile`), `FromBuilder` (the scheduler's `Join`), `ToBuilder` (the builder)
//!   and `ToClient` (the client). Job specs go through the builder's own checks; chunks are
//!   reassembled by `content::Assembly` (keyed by digest, as the receivers do), which must only
//!   ever hand back content of the declared digest and size.
//! - 4: the jail helper's job message (`kiln_jails::linux::helper::Job::parse`), NUL-separated
//!   words on its stdin.
//!
//! A job the builder accepts must reach the jail helper unchanged: encoded as the Linux
//! backend does, its words must parse back to the same job.
#![no_main]

use std::collections::HashMap;
use std::ffi::OsString;

use kiln_builder::check_spec_for_fuzzing;
use kiln_jails::linux::helper::Job;
use kiln_proto::content::{chunk_digest, Assembly};
use kiln_proto::v1::{
    from_builder, from_client, to_builder, to_client, Chunk, FromBuilder, FromClient, JobSpec,
    ToBuilder, ToClient,
};
use kiln_proto::{digest_of, Digest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The largest content reassembled here; what matters is that nothing is buffered before it
/// arrives, not the exact cap.
const MAX_CONTENT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut peer = Peer::default();
    match mode % 5 {
        0 => {
            while let Ok(m) = FromClient::decode_length_delimited(&mut rest) {
                match m.msg {
                    Some(from_client::Msg::Spec(spec)) => peer.spec(&spec),
                    Some(from_client::Msg::Chunk(chunk)) => peer.chunk(&chunk),
                    None => {}
                }
            }
        }
        1 => {
            while let Ok(m) = FromBuilder::decode_length_delimited(&mut rest) {
                match m.msg {
                    Some(from_builder::Msg::Register(r)) => peer.digests(&r.toolchains),
                    Some(from_builder::Msg::Toolchains(t)) => {
                        peer.digests(&t.added);
                        peer.digests(&t.evicted);
                    }
                    Some(from_builder::Msg::Need(n)) => {
                        peer.digests(&n.need.unwrap_or_default().files)
                    }
                    Some(from_builder::Msg::Finished(f)) => {
                        let outputs = f.finished.unwrap_or_default().outputs;
                        peer.digests(outputs.iter().filter_map(|o| o.digest.as_ref()));
                    }
                    Some(from_builder::Msg::Chunk(c)) => peer.chunk(&c.chunk.unwrap_or_default()),
                    Some(from_builder::Msg::Heartbeat(_) | from_builder::Msg::Rejected(_))
                    | None => {}
                }
            }
        }
        2 => {
            while let Ok(m) = ToBuilder::decode_length_delimited(&mut rest) {
                match m.msg {
                    Some(to_builder::Msg::Start(s)) => peer.spec(&s.spec.unwrap_or_default()),
                    Some(to_builder::Msg::Chunk(c)) => peer.chunk(&c.chunk.unwrap_or_default()),
                    Some(to_builder::Msg::Welcome(_) | to_builder::Msg::Cancel(_)) | None => {}
                }
            }
        }
        3 => {
            while let Ok(m) = ToClient::decode_length_delimited(&mut rest) {
                match m.msg {
                    Some(to_client::Msg::Need(n)) => peer.digests(&n.files),
                    Some(to_client::Msg::Finished(f)) => {
                        peer.digests(f.outputs.iter().filter_map(|o| o.digest.as_ref()))
                    }
                    Some(to_client::Msg::Chunk(c)) => peer.chunk(&c),
                    Some(to_client::Msg::Placed(_) | to_client::Msg::Refused(_)) | None => {}
                }
            }
        }
        _ => {
            if let Ok(job) = Job::parse(rest) {
                assert_round_trip(&job);
            }
        }
    }
});

/// The receiving side of one stream: content being reassembled, by digest and size.
#[derive(Default)]
struct Peer {
    assembling: HashMap<(Digest, u64), Assembly>,
}

impl Peer {
    fn spec(&mut self, spec: &JobSpec) {
        if check_spec_for_fuzzing(spec).is_err() {
            return;
        }
        // What `LinuxJail::run` sends the helper for this spec, in a slot's uid.
        let job = Job {
            uid: 1000,
            gid: 1000,
            cwd: spec.cwd.clone().into(),
            timeout_ms: spec.timeout_ms,
            memory: 1 << 30,
            processes: 256,
            file_size: 1 << 30,
            open_files: 1024,
            env: spec
                .env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value).into())
                .collect(),
            argv: spec.argv.iter().map(OsString::from).collect(),
        };
        assert_round_trip(&job);
    }

    fn digests<'a>(&mut self, wire: impl IntoIterator<Item = &'a kiln_proto::v1::Digest>) {
        for d in wire {
            let _ = digest_of(d);
        }
    }

    fn chunk(&mut self, chunk: &Chunk) {
        let Ok((digest, size)) = chunk_digest(chunk) else {
            return;
        };
        let mut asm = match self.assembling.remove(&(digest, size)) {
            Some(asm) => asm,
            None => match Assembly::new(digest, size, MAX_CONTENT) {
                Ok(asm) => asm,
                Err(_) => return,
            },
        };
        match asm.add(chunk) {
            Ok(Some(content)) => {
                assert_eq!(content.len() as u64, size, "content of another size");
                assert_eq!(Digest::of(&content), digest, "content of another digest");
            }
            Ok(None) => {
                self.assembling.insert((digest, size), asm);
            }
            Err(_) => {}
        }
    }
}

fn assert_round_trip(job: &Job) {
    let words = match job.to_words() {
        Ok(words) => words,
        Err(e) => panic!("the builder accepted a job the jail cannot be sent: {e}"),
    };
    match Job::parse(&words) {
        Ok(back) => assert_eq!(&back, job, "the jail would run another job"),
        Err(e) => panic!("the jail would refuse a job it was sent: {e}: {job:?}"),
    }
}
