//! The relay against a real scheduler on loopback, with a builder and clients simulated on the
//! real protocol: what the job table's unit tests cannot show, because it is about streams.

use std::time::Duration;

use bytes::Bytes;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{
    from_builder, from_client, to_builder, to_client, Chunk, Finished, FromBuilder, FromClient,
    JobChunk, JobFinished, JobSpec, Register, ToClient,
};
use kiln_proto::{wire_digest, Digest, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A scheduler on loopback, served until the returned task is dropped.
async fn scheduler() -> (String, kiln_net::task::Owned<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = kiln_scheduler::Config::default();
    let served = kiln_net::task::spawn(
        "scheduler",
        kiln_scheduler::serve(config, listener, None, std::future::pending()),
    );
    (url, served)
}

async fn connect(url: &str) -> SchedulerClient<Channel> {
    // Each caller its own connection, as each kiln process has.
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    SchedulerClient::new(channel)
}

fn toolchain() -> Digest {
    Digest::of(b"relay toolchain")
}

/// Opens job `label`'s stream; returns its sender (kept open) and its replies.
async fn submit(url: &str, label: &str) -> (mpsc::Sender<FromClient>, tonic::Streaming<ToClient>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(FromClient {
        msg: Some(from_client::Msg::Spec(JobSpec {
            protocol_version: PROTOCOL_VERSION,
            toolchain: Some(wire_digest(&toolchain(), 1)),
            os: "linux".into(),
            arch: "x86_64".into(),
            argv: vec!["cc".into()],
            label: label.into(),
            ..JobSpec::default()
        })),
    })
    .await
    .unwrap();
    let replies = connect(url)
        .await
        .compile(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, replies)
}

/// Reads job replies until one is not `Placed`.
async fn next_after_placed(replies: &mut tonic::Streaming<ToClient>) -> Option<to_client::Msg> {
    loop {
        match replies.message().await.unwrap()?.msg {
            Some(to_client::Msg::Placed(_)) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_up_no_other_job_on_its_builder() {
    let (url, _stop) = scheduler().await;
    let (out, rx) = mpsc::channel::<FromBuilder>(1024);
    out.send(FromBuilder {
        msg: Some(from_builder::Msg::Register(Register {
            protocol_version: PROTOCOL_VERSION,
            name: "sim".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            slots: 2,
            toolchains: vec![wire_digest(&toolchain(), 1)],
            jail: "linux".into(),
        })),
    })
    .await
    .unwrap();
    let mut incoming = connect(&url)
        .await
        .join(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut starts = Vec::new();
    // The welcome, then the jobs as they are placed.
    assert!(matches!(
        incoming.message().await.unwrap().unwrap().msg,
        Some(to_builder::Msg::Welcome(_))
    ));
    // The slow client: its job is placed, and it never reads a reply.
    let (_slow_tx, _slow_replies) = submit(&url, "slow.c").await;
    let (_fast_tx, mut fast_replies) = submit(&url, "fast.c").await;
    while starts.len() < 2 {
        if let Some(to_builder::Msg::Start(s)) = incoming.message().await.unwrap().unwrap().msg {
            starts.push((s.job_id, s.spec.unwrap().label));
        }
    }
    let job = |label: &str| starts.iter().find(|(_, l)| l == label).unwrap().0;
    let (slow, fast) = (job("slow.c"), job("fast.c"));
    // The slow job's results first: far more than its client's connection and any per-job
    // buffer of a few messages take, so a relay that waits for that client stalls here.
    let piece = Bytes::from(vec![7u8; 16 << 10]);
    let finished = |job_id| FromBuilder {
        msg: Some(from_builder::Msg::Finished(JobFinished {
            job_id,
            finished: Some(Finished::default()),
        })),
    };
    let chunk = |job_id, offset| FromBuilder {
        msg: Some(from_builder::Msg::Chunk(JobChunk {
            job_id,
            chunk: Some(Chunk {
                digest: Some(wire_digest(&Digest::of(b"out"), 1 << 30)),
                offset,
                data: piece.clone(),
            }),
        })),
    };
    out.send(finished(slow)).await.unwrap();
    for i in 0..400u64 {
        out.send(chunk(slow, i * piece.len() as u64)).await.unwrap();
    }
    out.send(finished(fast)).await.unwrap();
    out.send(chunk(fast, 0)).await.unwrap();
    // The fast client gets its result whatever the slow one does. The bound only turns a
    // stall into a failure instead of a hang.
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        let first = next_after_placed(&mut fast_replies).await;
        let second = fast_replies.message().await.unwrap().and_then(|m| m.msg);
        (first, second)
    })
    .await
    .expect("the fast job's result was held up behind the slow client");
    assert!(
        matches!(got.0, Some(to_client::Msg::Finished(_))),
        "{got:?}"
    );
    assert!(matches!(got.1, Some(to_client::Msg::Chunk(c)) if c.data.len() == piece.len()));
}
