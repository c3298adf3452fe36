//! The per-user agent: one warm, authenticated-at-the-transport connection to the farm's
//! scheduler, shared by every compile of a build.
//!
//! Without it each `kiln` process pays a TCP, TLS and HTTP/2 handshake before its first byte
//! reaches the scheduler: three round trips over a WAN, and most of the scheduler's CPU per job.
//! The agent is `kiln agent`, started on demand by the first compile that finds none, listening
//! on a Unix socket in the cache directory (`DIR/agent/<key>.sock`, the directory `0700`). It
//! forwards each HTTP/2 stream it is given onto its one connection to the scheduler, untouched:
//! requests keep the caller's own token, and the agent adds none to them, so it grants nothing
//! a caller does not already have (its own calls, the fallback reports below, carry the user's
//! token from the same configuration). The key names the scheduler, the CA, and this very `kiln`
//! executable, so another configuration or a rebuilt `kiln` gets an agent of its own.
//!
//! The agent is only ever an optimisation. A compile that cannot reach it (none yet, a stale
//! socket, a frozen or broken agent) starts one in the background and goes to the scheduler
//! directly, as kiln did before the agent existed. The agent exits when nothing has used it for
//! its idle time (`--idle`), or as soon as its socket is removed or replaced.
//!
//! It also carries news the other way: a compile that fell back to a local compile says why in
//! one datagram to `<key>.fallbacks` ([`tell_fallback`]), and the agent passes the counts on to
//! the scheduler every few seconds with the user's token, so operators see fallbacks by client
//! and cause without a compile ever waiting on it. It holds a lock on
//! `<key>.lock` beside the socket for its whole life, and that file holds its pid.

use std::convert::Infallible;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixDatagram, UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

use crate::dist::Farm;

/// How long an agent nobody uses stays up.
pub const IDLE: Duration = Duration::from_secs(600);
/// How long a compile waits for the agent's HTTP/2 handshake before going direct.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the agent looks at its socket and its idle time.
const TICK: Duration = Duration::from_secs(1);
/// How often the agent passes on the fallbacks compiles told it of.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// The longest Unix socket path the kernel takes (`sun_path`, less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the agent for `farm` listens, given the cache directory; `None` when that path is too
/// long for a Unix socket (a cache directory nested very deep), in which case there is no agent.
pub fn socket(dir: &Path, farm: &Farm) -> Option<PathBuf> {
    let mut key = blake3::Hasher::new();
    for part in [
        farm.url.as_bytes(),
        &kiln_proto::PROTOCOL_VERSION.to_le_bytes(),
    ] {
        key.update(&(part.len() as u64).to_le_bytes());
        key.update(part);
    }
    // The CA the agent verifies the scheduler with: its contents, so a replaced CA file is a
    // new agent too.
    match farm.tls.ca.as_deref().map(fs::read) {
        Some(Ok(pem)) => key.update(blake3::hash(&pem).as_bytes()),
        Some(Err(_)) => key.update(b"unreadable CA"),
        None => key.update(b"system roots"),
    };
    // This executable, as built: an agent started by another build of kiln is not this one's.
    if let Ok(exe) = std::env::current_exe() {
        key.update(exe.as_os_str().as_encoded_bytes());
        if let Ok(meta) = fs::metadata(&exe) {
            key.update(&meta.len().to_le_bytes());
            key.update(&meta.mtime().to_le_bytes());
            key.update(&meta.mtime_nsec().to_le_bytes());
        }
    }
    let name = format!("{}.sock", &key.finalize().to_hex()[..16]);
    let path = dir.join("agent").join(name);
    (path.as_os_str().len() <= MAX_SOCKET_PATH).then_some(path)
}

/// A channel to the scheduler through the agent at `socket`, or `None` when there is no usable
/// agent, in which case one is started in the background for the compiles that follow.
pub async fn channel(socket: &Path, settings: impl Fn(Endpoint) -> Endpoint) -> Option<Channel> {
    if !socket.exists() {
        // A directory another user made (a cache directory shared by a team) is never used,
        // and no agent is started for it on every compile.
        let foreign = socket
            .parent()
            .is_some_and(|dir| dir.exists() && check_private(dir).is_err());
        if !foreign {
            start(socket);
        }
        return None;
    }
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = UnixStream::connect(path).await?;
            // A live agent speaks first (HTTP/2's server preface); a frozen one, whose kernel
            // still takes the connection, never does, and the compile goes direct.
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.readable()).await {
                Ok(ready) => ready.map(|()| TokioIo::new(stream)),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the agent took its connection but says nothing",
                )),
            }
        }
    });
    // The URL is a placeholder: the connector decides where the bytes go, and the agent's own
    // connection gives each request the scheduler's address.
    let endpoint = settings(Endpoint::from_static("http://kiln-agent"));
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        endpoint.connect_with_connector(connector),
    )
    .await
    {
        Ok(Ok(channel)) => Some(channel),
        Ok(Err(e)) => {
            // Most often a socket left behind by an agent that died: a new one replaces it.
            tracing::debug!(socket = %socket.display(), error = %crate::dist::error_chain(&e), "the agent did not answer; going direct");
            start(socket);
            None
        }
        Err(_) => {
            tracing::debug!(socket = %socket.display(), "the agent took too long to answer; going direct");
            None
        }
    }
}

/// Starts `kiln agent --socket SOCKET` in the background. Several compiles may do this at once;
/// all but one of the agents find the socket's lock taken and exit.
fn start(socket: &Path) {
    let started = std::env::current_exe().and_then(|exe| {
        crate::process::spawn_detached(
            &exe,
            &["agent".as_ref(), "--socket".as_ref(), socket.as_os_str()],
        )
    });
    if let Err(e) = started {
        tracing::debug!(error = %e, "could not start the agent");
    }
}

/// Tells the agent of `farm`, if one runs, that a compile fell back to a local compile for
/// `cause`; the agent passes the counts on to the scheduler. One datagram: nothing waits for
/// it, and nothing fails when no agent listens.
pub fn tell_fallback(farm: &Farm, cause: &str) {
    let Some(socket) = &farm.agent else { return };
    let Ok(datagram) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let _ = datagram.set_nonblocking(true);
    let _ = datagram.send_to(cause.as_bytes(), fallbacks_socket(socket));
}

fn fallbacks_socket(socket: &Path) -> PathBuf {
    socket.with_extension("fallbacks")
}

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not a private directory of this user (owner uid {owner}, mode {mode:o}); remove it or fix its owner and mode 0700", path.display())]
    NotPrivate {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("the scheduler: {0}")]
    Scheduler(String),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes the socket's directory, private to this user, and checks an existing one is.
fn private_dir(dir: &Path) -> Result<(), AgentError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("creating", dir)(e)),
    }
    check_private(dir)
}

/// Checks that `dir` is a directory of this user's that nobody else may enter.
fn check_private(dir: &Path) -> Result<(), AgentError> {
    let meta = fs::symlink_metadata(dir).map_err(io_error("reading", dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != current_uid() || mode & 0o077 != 0 {
        return Err(AgentError::NotPrivate {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            mode,
        });
    }
    Ok(())
}

fn current_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `kiln agent`: serves the socket for `farm` until idle for `idle`, or until the socket is
/// removed. Returns at once, successfully, when another agent already serves it.
pub fn serve(socket: &Path, farm: &Farm, idle: Duration) -> Result<(), AgentError> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    // One agent per socket: the lock is held for the agent's life, so the file it guards is
    // only ever replaced by the one process that serves it.
    let lock_path = socket.with_extension("lock");
    let mut lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("opening", &lock_path))?;
    if lock.try_lock().is_err() {
        return Ok(());
    }
    // Who serves the socket, for an operator (and a test) to find.
    {
        use std::io::Write;
        lock.set_len(0)
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .map_err(io_error("writing", &lock_path))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_error("starting the runtime for", socket))?;
    runtime.block_on(run(socket, farm, idle))
}

async fn run(socket: &Path, farm: &Farm, idle: Duration) -> Result<(), AgentError> {
    let endpoint = kiln_net::tls::endpoint(&farm.url, &farm.tls)
        .map_err(|e| AgentError::Scheduler(e.to_string()))?;
    // Connect lazily: a scheduler that is down now may be up for the next compile; each
    // request that finds it down gets the transport's error, as a direct call would.
    let upstream = crate::dist::endpoint_settings(endpoint).connect_lazy();
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("removing the stale", socket)(e)),
    }
    let told = fallbacks_socket(socket);
    let _ = fs::remove_file(&told);
    let datagrams = UnixDatagram::bind(&told).map_err(io_error("listening on", &told))?;
    fs::set_permissions(&told, fs::Permissions::from_mode(0o600))
        .map_err(io_error("restricting", &told))?;
    let pending = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let _reporter = report_fallbacks(farm, upstream.clone(), pending.clone());
    let listener = UnixListener::bind(socket).map_err(io_error("listening on", socket))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .map_err(io_error("restricting", socket))?;
    let ours = fs::metadata(socket)
        .map_err(io_error("reading", socket))?
        .ino();
    tracing::info!(socket = %socket.display(), scheduler = %farm.url, "agent listening");

    let open = Arc::new(AtomicUsize::new(0));
    let last_used = Arc::new(Mutex::new(Instant::now()));
    let mut tick = tokio::time::interval(TICK);
    let mut datagram = [0u8; 64];
    loop {
        tokio::select! {
            told = datagrams.recv(&mut datagram) => {
                let Ok(n) = told else { continue };
                let cause = String::from_utf8_lossy(&datagram[..n]);
                // Only kiln's own causes: the scheduler turns them into metric labels.
                if let Some(name) = crate::dist::Fallback::NAMES.iter().find(|c| **c == cause) {
                    *pending.lock().expect("the agent's counts lock is never poisoned").entry(*name).or_insert(0u64) += 1;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let guard = Open::new(&open, &last_used);
                // Ends with its connection.
                kiln_net::task::detach("agent connection", connection(stream, upstream.clone(), guard));
            }
            _ = tick.tick() => {
                match fs::metadata(socket) {
                    Ok(meta) if meta.ino() == ours => {}
                    _ => {
                        tracing::info!("agent socket removed or replaced; exiting");
                        return Ok(());
                    }
                }
                let since = last_used.lock().expect("the agent's clock lock is never poisoned").elapsed();
                if open.load(Ordering::Acquire) == 0 && since >= idle {
                    tracing::info!(idle_s = since.as_secs(), "agent idle; exiting");
                    let _ = fs::remove_file(socket);
                    let _ = fs::remove_file(&told);
                    return Ok(());
                }
            }
        }
    }
}

/// Fallback counts told to the agent and not yet reported, by cause.
type Pending = Arc<Mutex<std::collections::BTreeMap<&'static str, u64>>>;

/// Passes fallback counts on to the scheduler every [`REPORT_EVERY`], in a task of its own so
/// a slow scheduler never holds up the relay. Counts a call fails to deliver are kept for the
/// next; a scheduler that does not know the call (an older one) is not asked again. Dropping
/// the handle stops the task.
fn report_fallbacks(farm: &Farm, upstream: Channel, pending: Pending) -> kiln_net::task::Owned<()> {
    let token = farm.token.interceptor();
    kiln_net::task::spawn("fallback reports", async move {
        let Ok(token) = token else {
            return;
        };
        let mut scheduler =
            kiln_proto::v1::scheduler_client::SchedulerClient::with_interceptor(upstream, token);
        let mut every = tokio::time::interval(REPORT_EVERY);
        loop {
            every.tick().await;
            let counts = std::mem::take(&mut *pending.lock().expect("never poisoned"));
            if counts.is_empty() {
                continue;
            }
            let report = kiln_proto::v1::FallbackReport {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                counts: counts
                    .iter()
                    .map(|(cause, count)| kiln_proto::v1::FallbackCount {
                        cause: (*cause).into(),
                        count: *count,
                    })
                    .collect(),
            };
            match scheduler.fallbacks(report).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Unimplemented => return,
                Err(s) => {
                    tracing::debug!(error = %s.message(), "fallback report not delivered; kept");
                    let mut pending = pending.lock().expect("never poisoned");
                    for (cause, count) in counts {
                        *pending.entry(cause).or_insert(0) += count;
                    }
                }
            }
        }
    })
}

/// A client connection being served: counted while open, and the agent's last use when it ends.
#[derive(Debug)]
struct Open {
    open: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Open {
    fn new(open: &Arc<AtomicUsize>, last_used: &Arc<Mutex<Instant>>) -> Open {
        open.fetch_add(1, Ordering::AcqRel);
        Open {
            open: open.clone(),
            last_used: last_used.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one compile's HTTP/2 connection: every stream on it goes to the scheduler over the
/// shared connection, and its answer comes back, trailers (the gRPC status) included.
async fn connection(stream: UnixStream, upstream: Channel, _open: Open) {
    let service = hyper::service::service_fn(
        move |request: tonic::codegen::http::Request<hyper::body::Incoming>| {
            let mut upstream = upstream.clone();
            async move {
                use tower::{Service, ServiceExt};
                let request = request.map(tonic::body::Body::new);
                let answer = match upstream.ready().await {
                    Ok(ready) => ready.call(request).await,
                    Err(e) => Err(e),
                };
                Ok::<_, Infallible>(answer.unwrap_or_else(|e| {
                    tonic::Status::unavailable(format!(
                        "{} (through kiln's agent)",
                        crate::dist::error_chain(&e)
                    ))
                    .into_http()
                }))
            }
        },
    );
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        // Toolchains travel through here on a first compile: windows wide enough that a local
        // hop never throttles them.
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "an agent connection ended with an error");
    }
}
