//! `--dist`: a cache miss compiled by a builder of the farm.
//!
//! The same command runs on the builder, in the same working directory, on the same files at
//! the same absolute paths: the source and its include closure ([`crate::closure`]) travel as
//! content-addressed files, the compiler as a toolchain archive ([`crate::toolchain`]). So the
//! object is the one the local compiler would have written, debug information included.
//!
//! Anything that goes wrong on the way is a [`Fallback`]: the caller compiles locally and counts
//! the cause. A compiler error on the builder is the compile's real result, except when the
//! compiler could not find a file, which may be a gap in the shipped closure: then the compile
//! runs locally too, so the diagnostics are always the local compiler's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::names::named_enum;

use bytes::Bytes;
use kiln_proto::content::{chunk_digest, chunks, Assembly};
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{
    from_client, refused, to_client, EnvVar, FromClient, InputFile, JobSpec, StatusReply,
    StatusRequest, ToClient,
};
use kiln_proto::{digest_of, wire_digest, Digest, MAX_MESSAGE, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::env::{Env, COMPILER_VARS};
use crate::progress::Progress;

// Each step of a call has a deadline of its own (issue 15: a scheduler stopped with SIGSTOP
// still has its kernel accept connections, so only the TCP connect had one, and compiles hung
// for the 900 s job bound). A step that misses its deadline is `Fallback::Stalled`.

/// How long to wait for the scheduler's TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP, TLS and HTTP/2 handshakes together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(6);
/// How long the scheduler may take to answer a job (its placement or a refusal). It answers
/// once it has handed the job to a builder, which a busy builder link can hold up a little.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single call (status, a report) may wait for its reply.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// While a job runs on a builder the scheduler may say nothing for minutes; HTTP/2 pings show
/// it is still there. One unanswered this long ends the job as stalled. A ping waits behind the
/// upload in flight (a first toolchain is tens of MB), so the answer is given time enough for a
/// slow uplink's window, and a frozen scheduler is still found in well under a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest a remote compile may take, transfers included.
const JOB_TIMEOUT: Duration = Duration::from_secs(900);
/// The largest output accepted from a builder.
const MAX_OUTPUT: u64 = 1 << 30;

named_enum! {
    /// Why a compile did not come back from the farm. Each is counted as `dist_fallback.<name>`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Fallback {
        /// `--dist` without a scheduler address.
        NoScheduler = "no_scheduler",
        /// The scheduler could not be reached, or went away mid-job.
        Unreachable(String) = "unreachable",
        /// The scheduler took a connection but stopped answering: a handshake, the answer to the
        /// job, or a keepalive ping missed its deadline.
        Stalled(String) = "stalled",
        /// This client's own configuration is unusable (a CA file that cannot be read, a URL
        /// that is not one).
        Config(String) = "config",
        NoBuilders(String) = "no_builders",
        NoCapacity(String) = "no_capacity",
        /// Builders were tried and failed.
        BuildersFailed(String) = "builders_failed",
        /// The scheduler or builder refused the job or spoke another protocol version.
        Refused(String) = "refused",
        /// The toolchain could not be packaged.
        Toolchain(String) = "toolchain",
        /// The inputs could not be listed or read, or a file was missing on the builder.
        Inputs(String) = "inputs",
        /// The job was killed on the builder (a limit), or the stream broke.
        Failed(String) = "failed",
        /// This compile cannot run elsewhere (it depends on this machine).
        Unsupported(String) = "unsupported",
        /// The builder answered with outputs other than the ones asked for: the result is refused
        /// whole, nothing of it is written, and the builder is reported suspect.
        Suspect(String) = "suspect",
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::NoScheduler => f.write_str("no scheduler is configured (KILN_SCHEDULER)"),
            Fallback::Unreachable(m)
            | Fallback::Stalled(m)
            | Fallback::Config(m)
            | Fallback::NoBuilders(m)
            | Fallback::NoCapacity(m)
            | Fallback::BuildersFailed(m)
            | Fallback::Refused(m)
            | Fallback::Toolchain(m)
            | Fallback::Inputs(m)
            | Fallback::Failed(m)
            | Fallback::Unsupported(m)
            | Fallback::Suspect(m) => write!(f, "{}: {m}", self.name().replace('_', " ")),
        }
    }
}

/// One remote compile, described.
#[derive(Debug)]
pub struct Request<'a> {
    pub scheduler: &'a Farm,
    /// The toolchain archive and its digest.
    pub toolchain: &'a Path,
    pub toolchain_digest: Digest,
    /// The compiler, absolute, then its arguments.
    pub argv: Vec<String>,
    pub cwd: &'a Path,
    pub env: &'a Env,
    /// Files to ship (absolute) and directories that must exist.
    pub files: &'a [PathBuf],
    /// What the closure scan read of some of `files`: their digests need no second read.
    pub read: &'a HashMap<PathBuf, crate::files::Hashed>,
    pub dirs: &'a [PathBuf],
    /// Files the command writes (absolute).
    pub outputs: &'a [PathBuf],
    /// The source file, sent ahead of any request and shown in status.
    pub source: &'a Path,
    /// stderr is a terminal: sending the toolchain shows its progress there.
    pub tty: bool,
}

/// What the builder's compile produced; the outputs are already written.
#[derive(Debug)]
pub struct Done {
    pub output: std::process::Output,
    pub builder: String,
    /// The builder lacked the toolchain and the scheduler did not have it: this client sent it.
    pub sent_toolchain: bool,
    /// The outputs it wrote.
    pub outputs: Vec<PathBuf>,
}

struct Input {
    path: PathBuf,
    size: u64,
}

/// Runs `req` on the farm and writes its outputs.
/// Where a file or directory the compiler names by `path` must be placed in the jail, and the
/// directories that must exist there for the compiler's own spelling of it to resolve: a path
/// with `..` (`/usr/lib/gcc/x86_64-linux-gnu/12/../../../../include/c++/12/map`) is resolved
/// by the kernel through the directories it names, so those must exist too.
fn placement(path: &Path, dirs: &mut Vec<PathBuf>) -> PathBuf {
    use std::path::Component;
    if !path.components().any(|c| c == Component::ParentDir) {
        return path.to_path_buf();
    }
    let mut prefix = PathBuf::new();
    for c in path.components() {
        if c == Component::ParentDir {
            dirs.push(std::fs::canonicalize(&prefix).unwrap_or_else(|_| lexical(&prefix)));
        }
        prefix.push(c);
    }
    std::fs::canonicalize(path).unwrap_or_else(|_| lexical(path))
}

/// `path` with `.` and `..` folded away by text alone.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

pub fn compile(req: &Request<'_>) -> Result<Done, Fallback> {
    let mut inputs: HashMap<Digest, Input> = HashMap::new();
    let mut files = Vec::with_capacity(req.files.len());
    let mut dirs = Vec::new();
    for dir in req.dirs {
        let placed = placement(dir, &mut dirs);
        dirs.push(placed);
    }
    for path in req.files {
        let placed = placement(path, &mut dirs);
        let (digest, size) = match req.read.get(path) {
            Some(known) => (known.digest, known.data.len() as u64),
            None => {
                let data = std::fs::read(path)
                    .map_err(|e| Fallback::Inputs(format!("reading {}: {e}", path.display())))?;
                (Digest::of(&data), data.len() as u64)
            }
        };
        files.push(InputFile {
            path: placed.to_string_lossy().into_owned(),
            digest: Some(wire_digest(&digest, size)),
            executable: false,
        });
        inputs.insert(
            digest,
            Input {
                path: path.clone(),
                size,
            },
        );
    }
    let toolchain_size = std::fs::metadata(req.toolchain)
        .map_err(|e| Fallback::Toolchain(format!("{}: {e}", req.toolchain.display())))?
        .len();
    let mut env: Vec<EnvVar> = COMPILER_VARS
        .iter()
        .chain(&["PATH"])
        .filter_map(|name| {
            req.env.get(name).map(|v| EnvVar {
                name: name.to_string(),
                value: v.to_string(),
            })
        })
        .collect();
    env.sort_by(|a, b| a.name.cmp(&b.name));
    let spec = JobSpec {
        protocol_version: PROTOCOL_VERSION,
        toolchain: Some(wire_digest(&req.toolchain_digest, toolchain_size)),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        argv: req.argv.clone(),
        env,
        cwd: req.cwd.to_string_lossy().into_owned(),
        inputs: files,
        dirs: {
            dirs.sort();
            dirs.dedup();
            dirs.iter()
                .filter(|d| d.components().count() > 1)
                .map(|d| d.to_string_lossy().into_owned())
                .collect()
        },
        outputs: req
            .outputs
            .iter()
            .map(|o| o.to_string_lossy().into_owned())
            .collect(),
        timeout_ms: 0,
        label: req.source.to_string_lossy().into_owned(),
        // With a core to spare, a busy farm is answered at once and the compile runs here;
        // without one, the job waits a little for the farm's next free slot instead of
        // crowding this machine (icecream's local slots, decided with no round trip).
        wait_for_slot: !core_to_spare(),
    };
    let source = std::fs::read(req.source).ok().map(Bytes::from);
    let hashed = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fallback::Failed(format!("starting the network runtime: {e}")))?;
    let runtime_ready = hashed.elapsed();
    let done = runtime.block_on(async {
        tokio::time::timeout(JOB_TIMEOUT, exchange(req, spec, source, &inputs))
            .await
            .unwrap_or_else(|_| Err(Fallback::Failed("the remote compile took too long".into())))
    })?;
    tracing::debug!(
        runtime_ms = format!("{:.1}", runtime_ready.as_secs_f64() * 1e3),
        remote_ms = format!("{:.1}", hashed.elapsed().as_secs_f64() * 1e3),
        builder = %done.builder,
        "remote compile done"
    );
    Ok(done)
}

/// Whether this machine has a core to spare for a compile of its own now.
fn core_to_spare() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::read_to_string("/proc/stat").map_or(true, |stat| spare_core(&stat, cores))
}

/// Fewer runnable tasks than cores, by `/proc/stat`'s `procs_running` (which counts the caller
/// itself). Where that cannot be read the answer is yes, so the farm's "no capacity" stays an
/// immediate answer, as it was before clients could wait.
fn spare_core(stat: &str, cores: usize) -> bool {
    stat.lines()
        .find_map(|l| l.strip_prefix("procs_running "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_none_or(|running| running.saturating_sub(1) < cores)
}

/// How to reach the farm's scheduler: its URL, the CA its certificate chains to, and the client
/// token to present.
#[derive(Debug, Clone)]
pub struct Farm {
    pub url: String,
    pub tls: kiln_net::tls::ClientFiles,
    pub token: kiln_net::auth::Credential,
    /// The agent's socket, when compiles share its connection ([`crate::agent`]).
    pub agent: Option<PathBuf>,
}

impl Farm {
    /// The configured scheduler, if any.
    pub fn from_config(cfg: &crate::config::Config) -> Option<Farm> {
        let mut farm = Farm {
            url: cfg.scheduler.clone()?,
            tls: cfg.tls(),
            token: cfg.credential(),
            agent: None,
        };
        if cfg.agent {
            farm.agent = crate::agent::socket(&cfg.dir, &farm);
        }
        Some(farm)
    }
}

type Client = SchedulerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        kiln_net::auth::Bearer,
    >,
>;

/// The settings of every connection to the scheduler, direct or the agent's.
pub(crate) fn endpoint_settings(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        // Flow-control windows that grow with the link: h2's fixed 64 KiB default caps a
        // download at 64 KiB per round trip, a few Mbit/s over a WAN.
        .http2_adaptive_window(true)
}

/// How a call reaches the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Through the agent's shared connection when there is one: compiles.
    Shared,
    /// On a connection of the call's own: `kiln dist-status`, which diagnoses the scheduler
    /// itself and must not report an agent's view of it.
    Direct,
}

async fn connect(farm: &Farm, route: Route) -> Result<Client, Fallback> {
    let url = &farm.url;
    let interceptor = farm.token.interceptor().map_err(Fallback::Refused)?;
    let endpoint =
        kiln_net::tls::endpoint(url, &farm.tls).map_err(|e| Fallback::Config(e.to_string()))?;
    if let (Some(socket), Route::Shared) = (&farm.agent, route) {
        if let Some(channel) = crate::agent::channel(socket, endpoint_settings).await {
            return Ok(client(channel, interceptor));
        }
    }
    let endpoint = endpoint_settings(endpoint);
    let channel = match tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return Err(Fallback::Unreachable(format!(
                "{url}: {}",
                explain(url, &error_chain(&e))
            )))
        }
        Err(_) => {
            return Err(stalled(
                url,
                "does not answer: no TLS/HTTP/2 handshake",
                HANDSHAKE_TIMEOUT,
            ))
        }
    };
    Ok(client(channel, interceptor))
}

fn client(channel: tonic::transport::Channel, interceptor: kiln_net::auth::Bearer) -> Client {
    SchedulerClient::with_interceptor(channel, interceptor)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn stalled(url: &str, what: &str, after: Duration) -> Fallback {
    Fallback::Stalled(format!(
        "the scheduler at {url} {what} within {} s (is it stopped, or overloaded?)",
        after.as_secs()
    ))
}

/// An error with its causes, as one line. A cause whose text is already there is left out:
/// transport errors often repeat their own text as their source.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let more = s.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cur = s.source();
    }
    text
}

/// `error` from talking to the scheduler at `url`, with what to do for the usual mistakes.
fn explain(url: &str, error: &str) -> String {
    if error.contains("UnknownIssuer") {
        return format!(
            "{error} (the scheduler's certificate is not signed by a CA this client trusts: \
             set KILN_CA_FILE, or ca_file in kiln's config, to the farm's CA, the ca.pem \
             kiln-scheduler init wrote)"
        );
    }
    if url.starts_with("http://") {
        return format!(
            "{error} (the scheduler speaks TLS unless it was started with --insecure: use \
             https:// in KILN_SCHEDULER)"
        );
    }
    error.to_string()
}

/// A status's message and its causes, each once. (`Status`'s own `Display` repeats them.)
fn status_message(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    if let Some(source) = std::error::Error::source(s) {
        let more = error_chain(source);
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
    }
    text
}

/// How long a scheduler whose connection broke has to take a new one before it is taken as
/// stalled rather than gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection to the scheduler broke (`Unreachable`). Whether it is gone or frozen shows
/// in a new handshake: a stopped process still has its kernel accept the connection, but never
/// answers the TLS handshake; a dead one refuses it or is unreachable. The keepalive pings that
/// end a frozen scheduler's stream leave no mark of their own on the error.
async fn gone_or_stalled(farm: &Farm, fallback: Fallback) -> Fallback {
    let Fallback::Unreachable(why) = &fallback else {
        return fallback;
    };
    let Ok(endpoint) = kiln_net::tls::endpoint(&farm.url, &farm.tls) else {
        return fallback;
    };
    let endpoint = endpoint.connect_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, endpoint.connect()).await {
        Err(_) => Fallback::Stalled(format!(
            "the scheduler at {} stopped answering mid-job, and a new connection got no \
             handshake within {} s (is it stopped, or overloaded?): {why}",
            farm.url,
            PROBE_TIMEOUT.as_secs()
        )),
        Ok(_) => fallback,
    }
}

fn status_fallback(url: &str, s: &tonic::Status) -> Fallback {
    let message = status_message(s);
    match s.code() {
        tonic::Code::FailedPrecondition
        | tonic::Code::InvalidArgument
        | tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied => Fallback::Refused(s.message().to_string()),
        tonic::Code::ResourceExhausted => Fallback::NoCapacity(s.message().to_string()),
        // The scheduler gone (its shutdown included), or the connection under the call broken.
        tonic::Code::Unavailable | tonic::Code::Cancelled => {
            Fallback::Unreachable(format!("{url}: {}", explain(url, &message)))
        }
        tonic::Code::Unknown | tonic::Code::Internal
            if s.message().starts_with("h2 protocol error") || url.starts_with("http://") =>
        {
            Fallback::Unreachable(format!("{url}: {}", explain(url, &message)))
        }
        _ => Fallback::Failed(format!("{:?}: {}", s.code(), explain(url, &message))),
    }
}

async fn exchange(
    req: &Request<'_>,
    spec: JobSpec,
    source: Option<Bytes>,
    inputs: &HashMap<Digest, Input>,
) -> Result<Done, Fallback> {
    let mut client = connect(req.scheduler, Route::Shared).await?;
    // Room for the spec and the whole source, which are sent before the call starts reading
    // the channel: a larger source would otherwise wait for ever on a full channel.
    let source_chunks = source
        .as_ref()
        .map_or(0, |d| d.len().div_ceil(kiln_proto::content::CHUNK));
    let (tx, rx) = mpsc::channel::<FromClient>(16 + source_chunks);
    let send = |msg: from_client::Msg| FromClient { msg: Some(msg) };
    // What the builder may give back: exactly these paths, nothing else (issue 16).
    let requested = spec.outputs.clone();
    let _ = tx.send(send(from_client::Msg::Spec(spec))).await;
    // The source is almost never on the builder yet: send it without waiting to be asked.
    let mut pushed = None;
    if let Some(data) = source {
        let digest = Digest::of(&data);
        if inputs.contains_key(&digest) {
            pushed = Some(digest);
            for chunk in chunks(&digest, &data) {
                let _ = tx.send(send(from_client::Msg::Chunk(chunk))).await;
            }
        }
    }
    let url = &req.scheduler.url;
    // The scheduler answers a job once it has placed it (or refused it): it must do so soon.
    let mut incoming = match tokio::time::timeout(
        PLACEMENT_TIMEOUT,
        client.compile(ReceiverStream::new(rx)),
    )
    .await
    {
        Ok(Ok(answer)) => answer.into_inner(),
        Ok(Err(s)) => return Err(gone_or_stalled(req.scheduler, status_fallback(url, &s)).await),
        Err(_) => {
            return Err(stalled(
                url,
                "does not answer: no placement for the job",
                PLACEMENT_TIMEOUT,
            ))
        }
    };

    let mut finished = None;
    let mut builder = String::new();
    // Uploads answering the current placement's needs; a new placement cancels them.
    let mut senders: Vec<kiln_net::task::Owned<()>> = Vec::new();
    let mut sent_toolchain = false;
    let mut pending: HashMap<Digest, Assembly> = HashMap::new();
    let mut received: HashMap<Digest, Bytes> = HashMap::new();
    loop {
        let msg = match incoming.message().await {
            Ok(Some(ToClient { msg: Some(m) })) => m,
            Ok(Some(_)) => continue,
            Ok(None) => return Err(Fallback::Failed("the scheduler ended the job early".into())),
            Err(s) => return Err(gone_or_stalled(req.scheduler, status_fallback(url, &s)).await),
        };
        match msg {
            to_client::Msg::Placed(p) => {
                tracing::debug!(builder = %p.builder, attempt = p.attempt, "placed");
                builder = p.builder;
                // A job placed again starts over: what an earlier builder sent is void.
                finished = None;
                pending.clear();
                received.clear();
                if p.attempt > 1 {
                    pushed = None;
                    for task in senders.drain(..) {
                        task.abort();
                    }
                }
            }
            to_client::Msg::Need(need) => {
                let tx = tx.clone();
                let toolchain = need.toolchain.then(|| req.toolchain.to_path_buf());
                sent_toolchain |= need.toolchain;
                let mut wanted = Vec::new();
                for wire in &need.files {
                    let digest = digest_of(wire).map_err(|e| Fallback::Failed(e.to_string()))?;
                    if Some(digest) == pushed {
                        continue;
                    }
                    let input = inputs.get(&digest).ok_or_else(|| {
                        Fallback::Failed(
                            "the builder asked for a file this job does not have".into(),
                        )
                    })?;
                    wanted.push((digest, input.path.clone(), input.size));
                }
                let tc_digest = req.toolchain_digest;
                let tty = req.tty;
                // Sending on its own task: the builder's answer may start before we finish.
                senders.retain(|t| !t.is_finished());
                senders.push(kiln_net::task::spawn("upload", async move {
                    if let Some(path) = toolchain {
                        if let Ok(data) = std::fs::read(&path) {
                            let total = data.len() as u64;
                            let mut progress =
                                Progress::new("sending the toolchain to the farm", tty);
                            for chunk in chunks(&tc_digest, &Bytes::from(data)) {
                                progress.update(chunk.offset + chunk.data.len() as u64, total);
                                if tx.send(send(from_client::Msg::Chunk(chunk))).await.is_err() {
                                    progress.finish();
                                    return;
                                }
                            }
                            progress.finish();
                        }
                    }
                    for (digest, path, _) in wanted {
                        let Ok(data) = std::fs::read(&path) else {
                            return;
                        };
                        // A file edited since it was hashed would fail the builder's check;
                        // sending it anyway lets the builder say so.
                        for chunk in chunks(&digest, &Bytes::from(data)) {
                            if tx.send(send(from_client::Msg::Chunk(chunk))).await.is_err() {
                                return;
                            }
                        }
                    }
                }));
            }
            to_client::Msg::Finished(f) => {
                if let Err(why) = check_outputs(&requested, &f.outputs) {
                    let builder = if f.builder.is_empty() {
                        builder
                    } else {
                        f.builder.clone()
                    };
                    return Err(suspect(&mut client, &builder, req.source, why).await);
                }
                for out in &f.outputs {
                    let wire = out
                        .digest
                        .as_ref()
                        .ok_or_else(|| Fallback::Failed("an output without a digest".into()))?;
                    let digest = digest_of(wire).map_err(|e| Fallback::Failed(e.to_string()))?;
                    let asm = Assembly::new(digest, wire.size, MAX_OUTPUT)
                        .map_err(|e| Fallback::Failed(e.to_string()))?;
                    pending.insert(digest, asm);
                }
                if !f.builder.is_empty() {
                    builder = f.builder.clone();
                }
                finished = Some(f);
            }
            to_client::Msg::Chunk(chunk) => {
                let (digest, _) =
                    chunk_digest(&chunk).map_err(|e| Fallback::Failed(e.to_string()))?;
                if let Some(asm) = pending.get_mut(&digest) {
                    match asm.add(&chunk) {
                        Ok(Some(data)) => {
                            pending.remove(&digest);
                            received.insert(digest, data);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Err(Fallback::Failed(format!("an output arrived damaged: {e}")))
                        }
                    }
                }
            }
            to_client::Msg::Refused(r) => {
                let reason =
                    refused::Reason::try_from(r.reason).unwrap_or(refused::Reason::Unspecified);
                return Err(match reason {
                    refused::Reason::NoBuilders => Fallback::NoBuilders(r.message),
                    refused::Reason::NoCapacity => Fallback::NoCapacity(r.message),
                    refused::Reason::BuildersFailed => Fallback::BuildersFailed(r.message),
                    _ => Fallback::Refused(r.message),
                });
            }
        }
        if finished.is_some() && pending.is_empty() {
            break;
        }
    }
    drop(tx);
    let f = finished.unwrap_or_default();
    if !f.killed.is_empty() {
        return Err(Fallback::Failed(format!(
            "killed on {builder}: {}",
            f.killed
        )));
    }
    if f.exit_code != 0 && looks_like_missing_file(&f.stderr) {
        return Err(Fallback::Inputs(format!(
            "the compile on {builder} could not find a file: {}",
            String::from_utf8_lossy(&f.stderr)
                .lines()
                .next()
                .unwrap_or("")
        )));
    }
    for out in &f.outputs {
        let digest = out.digest.as_ref().and_then(|d| digest_of(d).ok());
        let data = digest
            .and_then(|d| received.get(&d))
            .ok_or_else(|| Fallback::Failed(format!("output {} did not arrive", out.path)))?;
        kiln_cache::replace_output(Path::new(&out.path), data)
            .map_err(|e| Fallback::Failed(format!("writing {}: {e}", out.path)))?;
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(Done {
        output: std::process::Output {
            status: std::process::ExitStatus::from_raw((f.exit_code & 0xff) << 8),
            stdout: f.stdout.to_vec(),
            stderr: f.stderr.to_vec(),
        },
        builder,
        sent_toolchain,
        outputs: f.outputs.iter().map(|o| PathBuf::from(&o.path)).collect(),
    })
}

/// Checks a builder's outputs against the ones the job asked for: each at most once, and no
/// path that was not asked for. A builder is not trusted (SECURITY.md): one naming `~/.bashrc`
/// would otherwise have it written. Outputs may be missing (a failed compile writes none).
fn check_outputs(
    requested: &[String],
    returned: &[kiln_proto::v1::OutputFile],
) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for out in returned {
        if !requested.contains(&out.path) {
            return Err(format!(
                "it returned {:?}, which this compile did not ask for",
                out.path
            ));
        }
        if !seen.insert(out.path.as_str()) {
            return Err(format!("it returned {:?} twice", out.path));
        }
    }
    Ok(())
}

/// A builder whose result broke the protocol's promise: report it to the scheduler (which
/// places nothing more on it) and fall back. The report is best effort: the local compile
/// follows whatever it answers.
async fn suspect(client: &mut Client, builder: &str, source: &Path, why: String) -> Fallback {
    let reported = tokio::time::timeout(
        CALL_TIMEOUT,
        client.report(kiln_proto::v1::SuspectReport {
            protocol_version: PROTOCOL_VERSION,
            builder: builder.into(),
            label: source.to_string_lossy().into_owned(),
            differing: vec![format!("its outputs ({why})")],
            checked_by: "the client's output check".into(),
        }),
    )
    .await;
    let note = match reported {
        Ok(Ok(_)) => "reported to the scheduler as suspect".to_string(),
        Ok(Err(s)) => format!("reporting it failed: {}", s.message()),
        Err(_) => "reporting it timed out".to_string(),
    };
    tracing::warn!(builder, %why, "refused a builder's result");
    Fallback::Suspect(format!(
        "builder {builder} {why}; nothing of its result was written, {note}"
    ))
}

/// gcc's and clang's words for an `#include` that found nothing.
fn looks_like_missing_file(stderr: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stderr);
    text.contains("No such file or directory") || text.contains("file not found")
}

/// Tells the scheduler that `builder`'s outputs for `label` differed from a local compile.
pub fn report_suspect(
    farm: &Farm,
    builder: &str,
    label: &str,
    differing: Vec<String>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = connect(farm, Route::Shared)
            .await
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        let report = client.report(kiln_proto::v1::SuspectReport {
            protocol_version: PROTOCOL_VERSION,
            builder: builder.into(),
            label: label.into(),
            differing,
            checked_by: "local".into(),
        });
        tokio::time::timeout(CALL_TIMEOUT, report)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{}",
                    stalled(
                        &farm.url,
                        "does not answer: no reply to the report",
                        CALL_TIMEOUT
                    )
                )
            })?
            .map_err(|s| anyhow::anyhow!("{}: {}", farm.url, s.message()))?;
        Ok(())
    })
}

/// The farm as the scheduler sees it.
pub fn status(farm: &Farm) -> anyhow::Result<StatusReply> {
    let url = &farm.url;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = connect(farm, Route::Direct)
            .await
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, client.status(StatusRequest {}))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{}",
                    stalled(
                        url,
                        "does not answer: no reply to the status call",
                        CALL_TIMEOUT
                    )
                )
            })?
            .map_err(|s| anyhow::anyhow!("{url}: {}", s.message()))?;
        Ok(reply.into_inner())
    })
}

/// The status as a JSON document: `builders`, `jobs` and the totals.
pub fn status_json(s: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "protocol_version": s.protocol_version,
        "uptime_ms": s.uptime_ms,
        "jobs_done": s.jobs_done,
        "jobs_failed": s.jobs_failed,
        "builders": s.builders.iter().map(|b| serde_json::json!({
            "id": b.id,
            "name": b.name,
            "label": label(b),
            "health": b.health,
            "last_failure_ms": b.last_failure_ms,
            "os": b.os,
            "arch": b.arch,
            "jail": b.jail,
            "slots": b.slots,
            "running": b.running,
            "jobs_done": b.jobs_done,
            "jobs_failed": b.jobs_failed,
            "connected_ms": b.connected_ms,
            "toolchains_received": b.toolchains_received,
            "suspect": (!b.suspect.is_empty()).then_some(&b.suspect),
            "toolchains": b.toolchains_held,
        })).collect::<Vec<_>>(),
        "jobs": s.jobs.iter().map(|j| serde_json::json!({
            "id": j.id,
            "builder": j.builder,
            "builder_id": j.builder_id,
            "label": j.label,
            "running_ms": j.running_ms,
            "attempt": j.attempt,
        })).collect::<Vec<_>>(),
    })
}

/// A builder's name for people: the scheduler's label (the name, and the id when two builders
/// share the name), or the name from a scheduler that sends none.
fn label(b: &kiln_proto::v1::BuilderStatus) -> &str {
    if b.label.is_empty() {
        &b.name
    } else {
        &b.label
    }
}

/// The status as a table for people.
pub fn status_text(s: &StatusReply) -> String {
    let mut out = format!(
        "{} builder(s), {} job(s) in flight, {} done, {} failed\n",
        s.builders.len(),
        s.jobs.len(),
        s.jobs_done,
        s.jobs_failed
    );
    if !s.builders.is_empty() {
        out.push_str(&format!(
            "\n{:<24} {:<14} {:<6} {:>5} {:>8} {:>10} {:>7}  HEALTH\n",
            "BUILDER", "PLATFORM", "JAIL", "SLOTS", "RUNNING", "TOOLCHAINS", "DONE"
        ));
    }
    for b in &s.builders {
        let health = match b.last_failure_ms {
            Some(ms) if b.health != "suspect" => {
                format!("{} (last failure {} s ago)", b.health, ms / 1000)
            }
            _ => b.health.clone(),
        };
        out.push_str(&format!(
            "{:<24} {:<14} {:<6} {:>5} {:>8} {:>10} {:>7}  {}\n",
            label(b),
            format!("{}/{}", b.os, b.arch),
            b.jail,
            b.slots,
            b.running,
            b.toolchains_held,
            b.jobs_done,
            health
        ));
        if !b.suspect.is_empty() {
            out.push_str(&format!("  SUSPECT, no jobs placed: {}\n", b.suspect));
        }
    }
    if !s.jobs.is_empty() {
        out.push_str(&format!(
            "\n{:<8} {:<24} {:>8}  SOURCE\n",
            "JOB", "BUILDER", "MS"
        ));
        for j in &s.jobs {
            out.push_str(&format!(
                "{:<8} {:<24} {:>8}  {}\n",
                j.id, j.builder, j.running_ms, j.label
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a cause, as transport errors come.
    #[derive(Debug)]
    struct Chained(&'static str, Option<Box<Chained>>);

    impl std::fmt::Display for Chained {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chained {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn chain(texts: &[&'static str]) -> Chained {
        let mut e = None;
        for t in texts.iter().rev() {
            e = Some(Chained(t, e.map(Box::new)));
        }
        e.unwrap()
    }

    #[test]
    fn a_core_is_spare_while_fewer_tasks_run_than_there_are_cores() {
        let stat = |n: usize| format!("cpu  1 2 3\nctxt 99\nprocs_running {n}\nprocs_blocked 0\n");
        // procs_running counts this process too.
        assert!(spare_core(&stat(1), 2));
        assert!(spare_core(&stat(2), 2));
        assert!(!spare_core(&stat(3), 2));
        assert!(!spare_core(&stat(17), 16));
        // Unreadable: as before, the farm answers at once.
        assert!(spare_core("cpu 1 2 3\n", 2));
        assert!(spare_core("procs_running many\n", 2));
    }

    #[test]
    fn error_chains_say_each_cause_once() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "tcp connect error",
                    "tcp connect error",
                    "Connection refused (os error 111)",
                ],
                "tcp connect error: Connection refused (os error 111)",
            ),
            (
                &[
                    "transport error",
                    "invalid peer certificate: UnknownIssuer",
                    "invalid peer certificate: UnknownIssuer",
                ],
                "transport error: invalid peer certificate: UnknownIssuer",
            ),
            (&["a", "b", "c"], "a: b: c"),
        ];
        for (texts, want) in cases {
            assert_eq!(error_chain(&chain(texts)), *want);
        }
    }

    #[test]
    fn fallbacks_are_labelled_by_what_went_wrong_and_say_what_to_do() {
        let https = "https://sched:7070";
        let http = "http://sched:7070";
        // The status codes a scheduler or the transport ends a call with.
        let cases: &[(&str, tonic::Status, &str, &str)] = &[
            (
                https,
                tonic::Status::unauthenticated("no client token"),
                "refused",
                "no client token",
            ),
            (
                https,
                tonic::Status::permission_denied("builder token"),
                "refused",
                "builder token",
            ),
            (
                https,
                tonic::Status::resource_exhausted("all jobs"),
                "no_capacity",
                "all jobs",
            ),
            // A scheduler shutting down with the job in flight: it is gone, not full.
            (
                https,
                tonic::Status::unavailable("the scheduler is shutting down"),
                "unreachable",
                "shutting down",
            ),
            (
                http,
                tonic::Status::unknown("transport error"),
                "unreachable",
                "use https://",
            ),
            (
                http,
                tonic::Status::internal("h2 protocol error"),
                "unreachable",
                "use https://",
            ),
            (
                https,
                tonic::Status::unavailable("invalid peer certificate: UnknownIssuer"),
                "unreachable",
                "set KILN_CA_FILE",
            ),
            (https, tonic::Status::internal("oops"), "failed", "oops"),
        ];
        for (url, status, name, says) in cases {
            let f = status_fallback(url, status);
            assert_eq!(f.name(), *name, "{status:?}");
            assert!(f.to_string().contains(says), "{status:?}: {f}");
            assert!(Fallback::NAMES.contains(&f.name()));
        }
    }

    #[test]
    fn a_missing_ca_file_is_the_clients_configuration_not_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Farm {
            url: "https://127.0.0.1:1".into(),
            tls: kiln_net::tls::ClientFiles {
                ca: Some(dir.path().join("missing-ca.pem")),
                identity: None,
            },
            token: kiln_net::auth::Credential::None,
            agent: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Err(f) = runtime.block_on(connect(&farm, Route::Shared)) else {
            panic!("connected with a missing CA file");
        };
        assert_eq!(f.name(), "config", "{f}");
        assert!(f.to_string().contains("missing-ca.pem"), "{f}");
    }

    #[test]
    fn a_builder_gives_back_only_the_outputs_asked_for() {
        let requested = vec!["/w/a.o".to_string(), "/w/a.d".to_string()];
        let out = |paths: &[&str]| -> Vec<kiln_proto::v1::OutputFile> {
            paths
                .iter()
                .map(|p| kiln_proto::v1::OutputFile {
                    path: p.to_string(),
                    digest: None,
                })
                .collect()
        };
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["/w/a.o", "/w/a.d"], None),
            (&["/w/a.d", "/w/a.o"], None),
            // A failed compile writes nothing, or only some of them.
            (&[], None),
            (&["/w/a.d"], None),
            (&["/w/a.o", "/home/u/.bashrc"], Some("did not ask for")),
            (&["/w/a.o", "/w/a.o"], Some("twice")),
            (&["/w/./a.o"], Some("did not ask for")),
            (&["/w/x/../a.o"], Some("did not ask for")),
            (&["/w/a.o\0"], Some("did not ask for")),
            (&["w/a.o"], Some("did not ask for")),
        ];
        for (paths, refused) in cases {
            let got = check_outputs(&requested, &out(paths));
            match refused {
                None => assert_eq!(got, Ok(()), "{paths:?}"),
                Some(why) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(why)),
                    "{paths:?}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn the_status_table_shows_each_builders_label_and_health() {
        let builder = |id: &str, label: &str, health: &str, failed: Option<u64>| {
            kiln_proto::v1::BuilderStatus {
                id: id.into(),
                name: "host".into(),
                label: label.into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                jail: "linux".into(),
                slots: 4,
                health: health.into(),
                last_failure_ms: failed,
                ..Default::default()
            }
        };
        let reply = StatusReply {
            builders: vec![
                builder("b1", "host (b1)", "failed recently", Some(4_200)),
                builder("b2", "host (b2)", "ok", None),
                // A scheduler that sends no label: the name.
                builder("b3", "", "ok", Some(90_000)),
            ],
            ..Default::default()
        };
        let text = status_text(&reply);
        let rows: Vec<&str> = text.lines().skip(3).collect();
        assert!(
            rows[0].starts_with("host (b1) ")
                && rows[0].ends_with("  failed recently (last failure 4 s ago)"),
            "{text}"
        );
        assert!(
            rows[1].starts_with("host (b2) ") && rows[1].ends_with("  ok"),
            "{text}"
        );
        assert!(
            rows[2].starts_with("host ") && rows[2].ends_with("  ok (last failure 90 s ago)"),
            "{text}"
        );
    }

    #[test]
    fn paths_with_dotdot_are_placed_where_they_lead_and_their_prefixes_exist() {
        let mut dirs = Vec::new();
        let p = placement(Path::new("/nonexistent/a/b/../c/./d.h"), &mut dirs);
        assert_eq!(p, PathBuf::from("/nonexistent/a/c/d.h"));
        assert_eq!(dirs, vec![PathBuf::from("/nonexistent/a/b")]);
        let mut dirs = Vec::new();
        assert_eq!(
            placement(Path::new("/x/y.h"), &mut dirs),
            PathBuf::from("/x/y.h")
        );
        assert!(dirs.is_empty());
    }
}
