//! A load generator for `kiln-scheduler`: simulated builders and clients speaking the real
//! protocol to the real scheduler binary, over loopback, for a bounded time. Run it through
//! `bench/scheduler-load.sh`, which builds it in release mode, raises the open-files limit and
//! pins the scheduler and this program to different cores.
//!
//! For each number of builders (and with TLS and tokens or without), it starts a scheduler,
//! joins that many builders (one connection each, as real builders keep), then runs clients that
//! compile for a few seconds: each job opens a connection of its own, as every `kiln` process
//! does today (`--reuse` keeps one per client instead, and `--share` gives all clients one
//! connection whose streams carry their jobs side by side, as a per-user agent will). A simulated builder answers each job at
//! once with a 1 KiB object, so what is measured is the scheduler: its CPU per job (from
//! `/proc`), jobs per second, the latency a client sees, its memory per builder, and how long
//! the builders took to join.
//!
//! ```text
//! loadgen --scheduler PATH [--builders 10,100,1000] [--tls both|on|off] [--seconds 5]
//!         [--clients 8] [--slots 4] [--reuse | --share]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_net::auth::Credential;
use kiln_net::tls::ClientFiles;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{
    from_builder, from_client, to_builder, to_client, Finished, FromBuilder, FromClient, Heartbeat,
    JobChunk, JobFinished, JobSpec, OutputFile, Register,
};
use kiln_proto::{wire_digest, Digest, PROTOCOL_VERSION};
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Clone)]
struct Options {
    scheduler: PathBuf,
    builders: Vec<usize>,
    tls: Vec<bool>,
    seconds: u64,
    clients: usize,
    slots: u32,
    reuse: bool,
    /// One connection for all clients, its streams multiplexed.
    share: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        scheduler: PathBuf::new(),
        builders: vec![10, 100, 1000],
        tls: vec![false, true],
        seconds: 5,
        clients: 8,
        slots: 4,
        reuse: false,
        share: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--scheduler" => o.scheduler = value()?.into(),
            "--builders" => {
                o.builders = value()?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("--builders: {n}?")))
                    .collect::<Result<_, _>>()?
            }
            "--tls" => {
                o.tls = match value()?.as_str() {
                    "both" => vec![false, true],
                    "on" => vec![true],
                    "off" => vec![false],
                    other => return Err(format!("--tls both|on|off, not {other}")),
                }
            }
            "--seconds" => o.seconds = value()?.parse().map_err(|_| "--seconds: a number")?,
            "--clients" => o.clients = value()?.parse().map_err(|_| "--clients: a number")?,
            "--slots" => o.slots = value()?.parse().map_err(|_| "--slots: a number")?,
            "--reuse" => o.reuse = true,
            "--share" => o.share = true,
            _ => return Err(format!("unknown option {flag} (see the top of loadgen.rs)")),
        }
    }
    if o.scheduler.as_os_str().is_empty() {
        return Err("--scheduler PATH (the kiln-scheduler binary) is required".into());
    }
    Ok(o)
}

/// A running scheduler, killed when dropped.
struct Scheduler {
    child: Child,
    url: String,
    ca: Option<PathBuf>,
    client_token: Credential,
    builder_token: Credential,
    _dir: tempfile::TempDir,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start_scheduler(bin: &Path, tls: bool) -> Scheduler {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(bin).arg("--listen");
    cmd.arg(format!("127.0.0.1:{port}"));
    let (ca, client_token, builder_token) = if tls {
        let farm = dir.path().join("farm");
        let init = Command::new(bin)
            .arg("init")
            .arg(&farm)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(init.success(), "kiln-scheduler init failed");
        cmd.arg("--tls-cert").arg(farm.join("server.pem"));
        cmd.arg("--tls-key").arg(farm.join("server.key"));
        cmd.arg("--client-tokens").arg(farm.join("client-tokens"));
        cmd.arg("--builder-tokens").arg(farm.join("builder-tokens"));
        (
            Some(farm.join("ca.pem")),
            Credential::File(farm.join("client.token")),
            Credential::File(farm.join("builder.token")),
        )
    } else {
        cmd.arg("--insecure");
        (None, Credential::None, Credential::None)
    };
    let child = cmd
        .env("KILN_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("taskset (util-linux) runs the scheduler");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the scheduler did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let scheme = if tls { "https" } else { "http" };
    Scheduler {
        child,
        url: format!("{scheme}://127.0.0.1:{port}"),
        ca,
        client_token,
        builder_token,
        _dir: dir,
    }
}

/// The scheduler's user and system CPU time so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on every Linux architecture kiln supports.
    Duration::from_millis(ticks * 10)
}

/// Resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The toolchain every simulated builder holds and every job names.
fn toolchain() -> (Digest, u64) {
    (Digest::of(b"loadgen toolchain"), 17)
}

const OBJECT: &[u8] = &[0x7f; 1024];

/// One simulated builder: joins, beats, and answers every job at once with a 1 KiB object.
async fn builder(
    s: Arc<SchedulerInfo>,
    i: usize,
    slots: u32,
    joined: mpsc::Sender<Result<(), String>>,
) {
    let mut grpc = match client_of(&s, &s.builder_token).await {
        Ok(c) => c,
        Err(e) => {
            let _ = joined.send(Err(e)).await;
            return;
        }
    };
    let (out, rx) = mpsc::channel::<FromBuilder>(64);
    let (tc, size) = toolchain();
    let _ = out
        .send(FromBuilder {
            msg: Some(from_builder::Msg::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                name: format!("sim-{i}"),
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                slots,
                toolchains: vec![wire_digest(&tc, size)],
                jail: "linux".into(),
            })),
        })
        .await;
    let mut incoming = match grpc.join(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            let _ = joined.send(Err(format!("join: {}", e.message()))).await;
            return;
        }
    };
    let heartbeat = match incoming.message().await {
        Ok(Some(kiln_proto::v1::ToBuilder {
            msg: Some(to_builder::Msg::Welcome(w)),
        })) => Duration::from_millis(w.heartbeat_ms.max(100)),
        other => {
            let _ = joined.send(Err(format!("no welcome: {other:?}"))).await;
            return;
        }
    };
    let _ = joined.send(Ok(())).await;
    let beats = out.clone();
    let beat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tick.tick().await;
            let msg = FromBuilder {
                msg: Some(from_builder::Msg::Heartbeat(Heartbeat {
                    running: 0,
                    slots,
                })),
            };
            if beats.send(msg).await.is_err() {
                break;
            }
        }
    });
    let object = Bytes::from_static(OBJECT);
    let digest = Digest::of(OBJECT);
    while let Ok(Some(msg)) = incoming.message().await {
        let Some(to_builder::Msg::Start(start)) = msg.msg else {
            continue;
        };
        let output = start
            .spec
            .as_ref()
            .and_then(|s| s.outputs.first().cloned())
            .unwrap_or_default();
        let finished = Finished {
            exit_code: 0,
            outputs: vec![OutputFile {
                path: output,
                digest: Some(wire_digest(&digest, OBJECT.len() as u64)),
            }],
            builder: format!("sim-{i}"),
            ..Finished::default()
        };
        let _ = out
            .send(FromBuilder {
                msg: Some(from_builder::Msg::Finished(JobFinished {
                    job_id: start.job_id,
                    finished: Some(finished),
                })),
            })
            .await;
        for chunk in kiln_proto::content::chunks(&digest, &object) {
            let _ = out
                .send(FromBuilder {
                    msg: Some(from_builder::Msg::Chunk(JobChunk {
                        job_id: start.job_id,
                        chunk: Some(chunk),
                    })),
                })
                .await;
        }
    }
    beat.abort();
}

/// What builders and clients need of a [`Scheduler`], shareable across tasks.
struct SchedulerInfo {
    url: String,
    ca: Option<PathBuf>,
    client_token: Credential,
    builder_token: Credential,
}

type Grpc = SchedulerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        kiln_net::auth::Bearer,
    >,
>;

async fn client_of(s: &SchedulerInfo, token: &Credential) -> Result<Grpc, String> {
    let files = ClientFiles {
        ca: s.ca.clone(),
        identity: None,
    };
    let channel = kiln_net::tls::endpoint(&s.url, &files)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("dial: {e}"))?;
    Ok(SchedulerClient::with_interceptor(
        channel,
        token.interceptor()?,
    ))
}

/// One compile through the scheduler; the time it took.
async fn compile(grpc: &mut Grpc, n: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let (tc, size) = toolchain();
    let spec = JobSpec {
        protocol_version: PROTOCOL_VERSION,
        toolchain: Some(wire_digest(&tc, size)),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        argv: vec!["/usr/bin/cc".into(), "-c".into(), format!("/w/{n}.c")],
        cwd: "/w".into(),
        outputs: vec![format!("/w/{n}.o")],
        label: format!("{n}.c"),
        ..JobSpec::default()
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(FromClient {
        msg: Some(from_client::Msg::Spec(spec)),
    })
    .await
    .map_err(|_| "send")?;
    let mut stream = grpc
        .compile(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("compile: {}", e.message()))?
        .into_inner();
    let mut expected = None;
    let mut got = 0u64;
    loop {
        match stream
            .message()
            .await
            .map_err(|e| e.message().to_string())?
        {
            Some(m) => match m.msg {
                Some(to_client::Msg::Finished(f)) => {
                    expected = Some(
                        f.outputs
                            .iter()
                            .filter_map(|o| o.digest.as_ref())
                            .map(|d| d.size)
                            .sum::<u64>(),
                    );
                }
                Some(to_client::Msg::Chunk(c)) => got += c.data.len() as u64,
                Some(to_client::Msg::Refused(r)) => return Err(format!("refused: {}", r.message)),
                _ => {}
            },
            None => break,
        }
        if expected.is_some_and(|e| got >= e) {
            break;
        }
    }
    drop(tx);
    match expected {
        Some(_) => Ok(started.elapsed()),
        None => Err("the stream ended without a result".into()),
    }
}

struct Round {
    jobs: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
}

async fn clients(s: Arc<SchedulerInfo>, pid: u32, o: &Options) -> Round {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // With --share, one connection made before the clock starts, cloned into every client:
    // its jobs then travel as concurrent streams of that one connection.
    let shared = match o.share {
        true => Some(
            client_of(&s, &s.client_token)
                .await
                .expect("dial the scheduler"),
        ),
        false => None,
    };
    for c in 0..o.clients {
        let (s, stop, count) = (s.clone(), stop.clone(), count.clone());
        let reuse = o.reuse || o.share;
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut errors, mut first_error) = (0u64, None);
            let mut kept: Option<Grpc> = shared;
            while !stop.load(Ordering::Relaxed) {
                let n = count.fetch_add(1, Ordering::Relaxed) * 1000 + c as u64;
                let t = Instant::now();
                let grpc = match kept.take() {
                    Some(g) => Ok(g),
                    None => client_of(&s, &s.client_token).await,
                };
                let result = match grpc {
                    Ok(mut g) => {
                        let r = compile(&mut g, n).await;
                        if reuse {
                            kept = Some(g);
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut round = Round {
        jobs: 0,
        errors: 0,
        first_error: None,
        latencies: Vec::new(),
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
    };
    for t in tasks {
        let (lat, errors, first) = t.await.unwrap();
        round.latencies.extend(lat);
        round.errors += errors;
        if round.first_error.is_none() {
            round.first_error = first;
        }
    }
    round.wall = started.elapsed();
    round.cpu = cpu_time(pid).saturating_sub(cpu_before);
    round.jobs = round.latencies.len() as u64;
    round.latencies.sort();
    round
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<5} {:>8} {:>7} {:>8} {:>9} {:>13} {:>8} {:>8} {:>12} {:>10} {:>7}",
        "tls",
        "builders",
        "conn",
        "jobs",
        "jobs/s",
        "cpu/job (µs)",
        "p50 ms",
        "p99 ms",
        "KiB/builder",
        "joined s",
        "errors"
    );
    for &tls in &o.tls {
        for &n in &o.builders {
            let s = start_scheduler(&o.scheduler, tls);
            let pid = s.child.id();
            let info = Arc::new(SchedulerInfo {
                url: s.url.clone(),
                ca: s.ca.clone(),
                client_token: s.client_token.clone(),
                builder_token: s.builder_token.clone(),
            });
            let rss_before = rss_kib(pid);
            let (joined_tx, mut joined_rx) = mpsc::channel(1024);
            let join_started = Instant::now();
            let mut failed = 0usize;
            let first_failure = runtime.block_on(async {
                for i in 0..n {
                    tokio::spawn(builder(info.clone(), i, o.slots, joined_tx.clone()));
                }
                let mut first = None;
                for _ in 0..n {
                    match joined_rx.recv().await {
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            failed += 1;
                            first.get_or_insert(e);
                        }
                        None => break,
                    }
                }
                first
            });
            let joined = join_started.elapsed();
            let per_builder = rss_kib(pid).saturating_sub(rss_before) as f64 / n.max(1) as f64;
            let round = runtime.block_on(clients(info.clone(), pid, &o));
            let cpu_per_job = round.cpu.as_secs_f64() * 1e6 / round.jobs.max(1) as f64;
            println!(
                "{:<5} {:>8} {:>7} {:>8} {:>9.0} {:>13.0} {:>8.2} {:>8.2} {:>12.1} {:>10.2} {:>7}",
                if tls { "on" } else { "off" },
                n,
                if o.share {
                    "shared"
                } else if o.reuse {
                    "kept"
                } else {
                    "per job"
                },
                round.jobs,
                round.jobs as f64 / round.wall.as_secs_f64(),
                cpu_per_job,
                percentile(&round.latencies, 0.5),
                percentile(&round.latencies, 0.99),
                per_builder,
                joined.as_secs_f64(),
                round.errors + failed as u64,
            );
            if let Some(e) = first_failure {
                eprintln!("  {failed} builders failed to join; the first: {e}");
            }
            if let Some(e) = round.first_error {
                eprintln!("  {} jobs failed; the first: {e}", round.errors);
            }
            drop(s);
        }
    }
}
