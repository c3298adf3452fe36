//! The end-to-end test harness: real compilers, real files, the real `kiln` binary.
//!
//! Each [`Project`] is a fresh directory with its own cache and a clean environment (no
//! `KILN_*` variables leak in from the caller), so tests run in parallel without sharing state.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod link;
pub mod shared;

/// The workspace's binaries (`kiln`, `kiln-cache`), built on first use so they are never stale.
fn built(name: &str) -> PathBuf {
    static BUILD: OnceLock<()> = OnceLock::new();
    BUILD.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "kiln-client",
                "-p",
                "kiln-cache-server",
                "-p",
                "kiln-jails",
                "-p",
                "kiln-scheduler",
                "-p",
                "kiln-builder",
                "--bins",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for kiln's binaries");
        assert!(status.success(), "building kiln's binaries failed");
    });
    // target/<profile>/deps/<this test> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(name);
    assert!(bin.exists(), "{name} not found at {}", bin.display());
    bin
}

/// The `kiln` binary.
/// One of the workspace's programs (`kiln-scheduler`, `kiln-builder`, `kiln-cache`…), built on
/// first use.
pub fn program(name: &str) -> PathBuf {
    built(name)
}

pub fn kiln_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("kiln"))
}

/// A `kiln-cache` server on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct CacheServer {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl CacheServer {
    /// Starts `kiln-cache --listen 127.0.0.1:0 --dir DIR EXTRA...` and waits for the line that
    /// says where it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> CacheServer {
        use std::io::BufRead;
        // Plain text and open writes unless the test brings TLS or tokens.
        let secure = extra.iter().any(|a| *a == "--tls-cert" || *a == "--tokens");
        let mut child = Command::new(built("kiln-cache"))
            .args(["--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .args(extra)
            .args(if secure { &[][..] } else { &["--insecure"][..] })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start kiln-cache");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read kiln-cache's first line");
        let addr = line
            .split_whitespace()
            .filter_map(|w| w.split_once("://").map(|(_, a)| a))
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("kiln-cache did not say where it listens: {line:?}"))
            .to_owned();
        CacheServer { child, addr }
    }

    /// The server's URL, for `KILN_REMOTE_CACHE`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 request; returns the status and the body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.request_with(method, path, &[], body)
    }

    /// The server's `/metrics`.
    pub fn metrics(&self) -> Metrics {
        scrape(&self.addr)
    }

    /// One HTTP/1.1 request with extra headers.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        http_request(&self.addr, method, path, headers, body)
    }
}

/// A `/metrics` scrape: series (name and labels, as written) to value.
pub type Metrics = std::collections::HashMap<String, f64>;

/// Reads `http://ADDR/metrics` and parses Prometheus's text format.
pub fn scrape(addr: &str) -> Metrics {
    let (status, body) = http_request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a series and its value");
            (name.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

/// One HTTP/1.1 request to `addr` on a connection of its own; returns the status and the body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status_line = String::from_utf8_lossy(&response[..split])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, response[split + 4..].to_vec())
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails the test with a clear message when a tool the test needs is not on PATH.
pub fn require(tool: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    assert!(
        found,
        "{tool} is not installed: scripts/test.sh installs what the tests need"
    );
}

/// A scratch project with its own kiln cache.
#[derive(Debug)]
pub struct Project {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    /// Extra environment for kiln runs.
    pub env: Vec<(String, String)>,
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = dir.path().join(".kiln-cache");
        Project {
            dir,
            cache,
            env: Vec::new(),
        }
    }

    /// A project whose kiln uses the `kiln-cache` at `url` as its remote tier: another
    /// machine, as far as kiln can tell.
    pub fn with_remote(url: &str) -> Project {
        let mut p = Project::new();
        p.env.push(("KILN_REMOTE_CACHE".into(), url.to_owned()));
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file, creating its directory.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// A command running in the project with a clean kiln environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("KILN_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KILN_DIR", &self.cache)
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C");
        cmd.env_remove("XDG_CONFIG_HOME")
            .env_remove("SOURCE_DATE_EPOCH");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `kiln <args>`.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(kiln_bin())
            .args(args)
            .output()
            .expect("run kiln")
    }

    /// Runs the compiler directly.
    pub fn bare(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("run compiler")
    }

    /// Compiles through kiln, then with the bare compiler, and asserts that `output` came out
    /// byte-identical both times.
    pub fn kiln_matches_bare(&self, args: &[&str], output: &str) {
        ok(&self.kiln(args));
        let cached = self.read(output);
        ok(&self.bare(args));
        assert_eq!(
            cached,
            self.read(output),
            "{output} from kiln differs from the compiler's ({args:?})"
        );
    }

    /// `kiln stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.kiln(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "kiln stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    pub fn stat(&self, name: &str) -> i64 {
        let s = self.stats();
        s[name]
            .as_i64()
            .unwrap_or_else(|| panic!("no stat {name} in {s}"))
    }

    pub fn reason(&self, name: &str) -> i64 {
        self.stats()["uncacheable_by_reason"][name]
            .as_i64()
            .unwrap_or(0)
    }

    /// The cache's entry files of one kind (`R` results, `M` manifests).
    pub fn entries(&self, kind: char) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(&self.cache) else {
            return out;
        };
        for shard in shards.flatten() {
            let Ok(subs) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for sub in subs.flatten() {
                let Ok(files) = std::fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.len() == 63 && name.ends_with(kind) {
                        out.push(f.path());
                    }
                }
            }
        }
        out
    }
}

/// Asserts a command succeeded, showing its stderr otherwise.
pub fn ok(out: &Output) -> &Output {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// File timestamps are coarse, and kiln refuses to store a result whose inputs changed within
/// a short margin of the compile (they may have changed during it). Tests that edit a file and
/// then expect it to be cached wait this long first.
pub fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(150));
}

/// A tmpfs of a fixed size mounted for the life of the value (needs root, as CI has).
#[derive(Debug)]
pub struct TinyDisk {
    pub path: PathBuf,
}

impl TinyDisk {
    pub fn mount(path: PathBuf, size: &str) -> TinyDisk {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { path }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The `kiln-jail` helper.
pub fn jail_helper() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("kiln-jail"))
}

type Task = tokio::task::JoinHandle<anyhow::Result<()>>;

/// The jails a [`Farm`]'s builders run jobs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FarmJail {
    /// Real Linux jails.
    Linux,
    /// `--jail pot`, driving potsim (jails/tests/potsim/potsim.py), a simulator of FreeBSD's
    /// pot, jexec and rctl: one simulated FreeBSD host per builder, with a template pot holding
    /// /bin/sh and /usr/bin/env.
    PotSim,
}

/// The uid of builder `i`'s jobs (pot jails: its template's user). Distinct per builder:
/// process limits count per user.
fn uid_base(i: usize) -> u32 {
    62_000 + 100 * i as u32
}

/// Makes builder `i`'s simulated FreeBSD host under `dir` (once) and its pot settings.
fn potsim_host(dir: &Path, i: usize) -> kiln_jails::pot::PotConfig {
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jails/tests/potsim/potsim.py");
    if !dir.join("fs").exists() {
        let out = Command::new("python3")
            .arg(&sim)
            .arg("setup")
            .arg(dir)
            .args(["--template", "kiln-template", "--user", "kiln"])
            .args(["--uid", &uid_base(i).to_string()])
            .args(["--copy", "/bin/sh", "--copy", "/usr/bin/env"])
            .output()
            .expect("python3 runs the pot simulator");
        assert!(
            out.status.success(),
            "potsim setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    kiln_jails::pot::PotConfig {
        pot: dir.join("bin/pot"),
        jexec: dir.join("bin/jexec"),
        rctl: Some(dir.join("bin/rctl")),
        fs_root: dir.join("fs"),
        ..kiln_jails::pot::PotConfig::default()
    }
}

/// A scheduler client that presents a token.
pub type GrpcClient = kiln_proto::v1::scheduler_client::SchedulerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        kiln_net::auth::Bearer,
    >,
>;

/// A compile farm in this process: a scheduler and builders with real Linux jails (or pots on
/// potsim), on 127.0.0.1. Builders and the scheduler can be killed and restarted. It runs as a
/// user would deploy it: TLS with certificates and tokens from `kiln-scheduler init`.
pub struct Farm {
    runtime: tokio::runtime::Runtime,
    pub addr: std::net::SocketAddr,
    /// Where the scheduler serves `/metrics`.
    pub http: std::net::SocketAddr,
    scheduler: Option<(tokio::sync::oneshot::Sender<()>, Task)>,
    builders: Vec<Option<(tokio::sync::oneshot::Sender<()>, Task)>>,
    /// Where each builder serves `/metrics`.
    builder_http: Vec<Option<std::net::SocketAddr>>,
    dir: tempfile::TempDir,
    slots: u32,
    jail: FarmJail,
    /// A kiln-cache the scheduler watches for the dashboard.
    cache: Option<String>,
    /// What `kiln-scheduler init` wrote: the CA, certificates and tokens.
    pub secrets: std::path::PathBuf,
}

impl std::fmt::Debug for Farm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Farm").field("addr", &self.addr).finish()
    }
}

impl Farm {
    /// A scheduler and `builders` builders of `slots` slots each, all joined.
    pub fn start(builders: usize, slots: u32) -> Farm {
        Farm::start_with(builders, slots, FarmJail::Linux)
    }

    /// [`Farm::start`] with builders whose jails are `jail`.
    pub fn start_with(builders: usize, slots: u32, jail: FarmJail) -> Farm {
        Farm::start_full(builders, slots, jail, None)
    }

    /// [`Farm::start`] with a scheduler that charts the hit rate of the kiln-cache at `cache`.
    pub fn start_watching_cache(builders: usize, slots: u32, cache: &str) -> Farm {
        Farm::start_full(builders, slots, FarmJail::Linux, Some(cache.to_owned()))
    }

    fn start_full(builders: usize, slots: u32, jail: FarmJail, cache: Option<String>) -> Farm {
        // KILN_TEST_LOG=debug shows what the scheduler and builders do.
        let level = std::env::var("KILN_TEST_LOG").ok();
        if let Some(level) = level.and_then(|l| l.parse::<tracing::Level>().ok()) {
            let _ = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_test_writer()
                .try_init();
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let http = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let http_addr = http.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        kiln_scheduler::init::farm(&secrets, &[]).unwrap();
        let mut farm = Farm {
            secrets,
            runtime,
            addr,
            http: http_addr,
            scheduler: None,
            builders: Vec::new(),
            builder_http: Vec::new(),
            dir,
            slots,
            jail,
            cache,
        };
        farm.serve_scheduler(listener, http);
        for i in 0..builders {
            farm.start_builder(i);
        }
        farm.wait_for_builders(builders);
        farm
    }

    /// `https://127.0.0.1:PORT`, for KILN_SCHEDULER.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A file `kiln-scheduler init` wrote, such as `ca.pem` or `client.token`.
    pub fn secret(&self, name: &str) -> std::path::PathBuf {
        self.secrets.join(name)
    }

    /// A relay in front of the scheduler, shaped like `shape` ([`link`]): the URL that reaches
    /// the scheduler through it, and what went through it.
    pub fn link(&self, shape: link::Shape) -> (String, std::sync::Arc<link::Counts>) {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let counts = std::sync::Arc::new(link::Counts::default());
        self.runtime
            .spawn(link::relay(listener, self.addr, shape, counts.clone()));
        (url, counts)
    }

    /// How a client reaches this farm.
    pub fn client(&self) -> kiln_client::dist::Farm {
        kiln_client::dist::Farm {
            url: self.url(),
            tls: kiln_net::tls::ClientFiles {
                ca: Some(self.secret("ca.pem")),
                identity: None,
            },
            token: kiln_net::auth::Credential::File(self.secret("client.token")),
            agent: None,
        }
    }

    /// A gRPC client of the scheduler that presents the client token, for tests that speak
    /// the protocol themselves.
    pub async fn grpc(&self) -> GrpcClient {
        self.grpc_with(kiln_net::auth::Credential::File(
            self.secret("client.token"),
        ))
        .await
    }

    /// [`Farm::grpc`] presenting `token` instead.
    pub async fn grpc_with(&self, token: kiln_net::auth::Credential) -> GrpcClient {
        let farm = kiln_client::dist::Farm {
            token,
            ..self.client()
        };
        let channel = kiln_net::tls::endpoint(&farm.url, &farm.tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        kiln_proto::v1::scheduler_client::SchedulerClient::with_interceptor(
            channel,
            farm.token.interceptor().unwrap(),
        )
    }

    /// The scheduler's security, as `kiln-scheduler` makes it from the files init wrote.
    fn security(&self) -> (kiln_net::tls::Listen, kiln_scheduler::auth::Auth) {
        let listen = kiln_net::tls::Listen::Tls(
            kiln_net::tls::server_config(&kiln_net::tls::ServerFiles {
                cert: self.secret("server.pem"),
                key: self.secret("server.key"),
                client_ca: Some(self.secret("ca.pem")),
            })
            .unwrap(),
        );
        let tokens = |name: &str| {
            Some(std::sync::Arc::new(
                kiln_net::auth::Tokens::open(&self.secret(name)).unwrap(),
            ))
        };
        let auth = kiln_scheduler::auth::Auth {
            client_tokens: tokens("client-tokens"),
            builder_tokens: tokens("builder-tokens"),
            builder_certs: true,
            local_builder: None,
        };
        (listen, auth)
    }

    fn serve_scheduler(
        &mut self,
        listener: tokio::net::TcpListener,
        http: tokio::net::TcpListener,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (listen, auth) = self.security();
        let config = kiln_scheduler::Config {
            listen,
            // The dashboard and metrics stay plain for the tests' own HTTP client and browser.
            http_listen: Some(kiln_net::tls::Listen::Insecure),
            auth,
            heartbeat: std::time::Duration::from_millis(500),
            cache: self.cache.clone(),
            cache_poll: std::time::Duration::from_millis(100),
            ..kiln_scheduler::Config::default()
        };
        let task = self
            .runtime
            .spawn(kiln_scheduler::serve(config, listener, Some(http), async {
                let _ = rx.await;
            }));
        self.scheduler = Some((tx, task));
    }

    /// Stops the scheduler (gracefully) and starts a new one on the same address.
    pub fn restart_scheduler(&mut self) {
        if let Some((tx, task)) = self.scheduler.take() {
            let _ = tx.send(());
            self.runtime.block_on(task).unwrap().unwrap();
        }
        let listener = self.rebind(self.addr);
        let http = self.rebind(self.http);
        self.serve_scheduler(listener, http);
    }

    /// Binds `addr` again. The scheduler's port came from the ephemeral range, so while it is
    /// closed a builder redialling it can be given that very port for its own end (a TCP
    /// self-connect) until the failed handshake closes it: wait for the port, not a fixed time.
    fn rebind(&self, addr: std::net::SocketAddr) -> tokio::net::TcpListener {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self.runtime.block_on(tokio::net::TcpListener::bind(addr)) {
                Ok(listener) => return listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("rebinding the scheduler's {addr}: {e}"),
            }
        }
    }

    /// Starts builder `i` (again).
    pub fn start_builder(&mut self, i: usize) {
        self.start_builder_with(i, |_| {});
    }

    /// The toolchains builder `i` keeps, read from its disk: the scheduler does not tell clients
    /// their digests.
    pub fn toolchains_on(&self, i: usize) -> Vec<kiln_proto::Digest> {
        let dir = self.builder_dir(i).join("toolchains");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".tar.gz")?.parse().ok()
            })
            .collect()
    }

    /// Builder `i`'s work directory: its toolchains, inputs and images.
    pub fn builder_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("builder{i}"))
    }

    /// [`Farm::start_builder`] with settings changed by `change`, such as its credentials.
    pub fn start_builder_with(&mut self, i: usize, change: impl FnOnce(&mut kiln_builder::Config)) {
        let work = self.dir.path().join(format!("builder{i}"));
        let mut config = kiln_builder::Config::new(&self.url(), work, jail_helper().to_path_buf());
        config.name = format!("builder{i}");
        config.tls.ca = Some(self.secret("ca.pem"));
        config.token = kiln_net::auth::Credential::File(self.secret("builder.token"));
        config.slots = self.slots;
        config.uid_base = uid_base(i);
        change(&mut config);
        if self.jail == FarmJail::PotSim {
            let host = self.dir.path().join(format!("builder{i}-freebsd"));
            config.jail = kiln_builder::JailKind::Pot(potsim_host(&host, i));
        }
        let http = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let http_addr = http.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = self.runtime.spawn(kiln_builder::serve(
            config,
            Some((http, kiln_net::tls::Listen::Insecure)),
            async {
                let _ = rx.await;
            },
        ));
        if self.builders.len() <= i {
            self.builders.resize_with(i + 1, || None);
            self.builder_http.resize(i + 1, None);
        }
        self.builders[i] = Some((tx, task));
        self.builder_http[i] = Some(http_addr);
    }

    /// Kills builder `i` at once, as a crash would: its link to the scheduler drops mid-job.
    pub fn kill_builder(&mut self, i: usize) {
        if let Some((_, task)) = self.builders[i].take() {
            task.abort();
            let _ = self.runtime.block_on(task);
        }
    }

    /// The scheduler's status, as `kiln dist-status --json` prints it.
    pub fn status(&self) -> serde_json::Value {
        let status = kiln_client::dist::status(&self.client()).expect("scheduler status");
        kiln_client::dist::status_json(&status)
    }

    /// The dashboard's data, `GET /api/status`.
    pub fn dashboard(&self) -> serde_json::Value {
        let (status, body) = http_request(&self.http.to_string(), "GET", "/api/status", &[], b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("the dashboard's JSON")
    }

    /// The scheduler's `/metrics`.
    pub fn metrics(&self) -> Metrics {
        scrape(&self.http.to_string())
    }

    /// Builder `i`'s `/metrics`.
    pub fn builder_metrics(&self, i: usize) -> Metrics {
        let addr = self.builder_http[i].expect("a builder that was started");
        scrape(&addr.to_string())
    }

    /// Waits until `n` builders have joined.
    pub fn wait_for_builders(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let joined = kiln_client::dist::status(&self.client())
                .map(|s| s.builders.len())
                .unwrap_or(0);
            if joined == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{joined} of {n} builders joined in 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A project whose kiln sends misses to this farm.
    pub fn project(&self) -> Project {
        let mut p = Project::new();
        p.env.push(("KILN_SCHEDULER".into(), self.url()));
        p.env.push((
            "KILN_CA_FILE".into(),
            self.secret("ca.pem").display().to_string(),
        ));
        p.env.push((
            "KILN_TOKEN_FILE".into(),
            self.secret("client.token").display().to_string(),
        ));
        p.env.push(("KILN_DIST".into(), "1".into()));
        p
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for b in self.builders.iter_mut() {
            if let Some((tx, task)) = b.take() {
                let _ = tx.send(());
                let _ = self.runtime.block_on(task);
            }
        }
        if let Some((tx, task)) = self.scheduler.take() {
            let _ = tx.send(());
            let _ = self.runtime.block_on(task);
        }
        // Builders killed mid-job leave their containers mounted.
        use kiln_jails::Backend;
        for i in (0..self.builders.len()).filter(|_| self.jail == FarmJail::Linux) {
            let jail = self.dir.path().join(format!("builder{i}/jail"));
            if let Ok(j) =
                kiln_jails::linux::LinuxJail::new(&jail, jail_helper(), Default::default())
            {
                let _ = j.cleanup_leftovers();
            }
        }
    }
}

/// The sources the farm tests compile: a C program and a C++ file sharing a project header,
/// with system headers from libc and libstdc++.
pub mod sample {
    use super::{ok, Farm, Project};

    pub const HEADER: &str = "#pragma once\n#define SCALE 3\nint helper(int);\n";

    pub const C_SOURCE: &str = r#"#include <stdio.h>
#include <string.h>
#include "util.h"
static int table[64];
int helper(int x) { return x * SCALE; }
int main(int argc, char **argv) {
    for (int i = 0; i < 64; i++) table[i] = helper(i) ^ (int)strlen(argv[0]);
    printf("%d %d\n", argc, table[argc]);
    return 0;
}
"#;

    pub const CXX_SOURCE: &str = r#"#include <map>
#include <string>
#include <vector>
#include "util.h"
std::map<std::string, std::vector<int>> build(int n) {
    std::map<std::string, std::vector<int>> m;
    for (int i = 0; i < n; i++) m[std::to_string(i)].push_back(i * SCALE);
    return m;
}
"#;

    /// A project of `farm` holding the sample sources, aged past the timestamp slack.
    pub fn project(farm: &Farm) -> Project {
        let p = farm.project();
        p.write("inc/util.h", HEADER);
        p.write("src/main.c", C_SOURCE);
        p.write("src/map.cc", CXX_SOURCE);
        // Files younger than the timestamp slack are not trusted to be unchanged: let them age.
        super::settle();
        p
    }

    /// Compiles through the farm, then locally with the bare compiler, and compares the
    /// output and the diagnostics (nothing of kiln's own may reach a stderr that is no terminal).
    pub fn remote_matches_local(p: &Project, args: &[&str], output: &str) {
        let farm = p.kiln(args);
        ok(&farm);
        let remote = p.read(output);
        let local = p.bare(args);
        ok(&local);
        assert_eq!(
            remote,
            p.read(output),
            "{output} from the farm differs ({args:?})"
        );
        assert_eq!(
            String::from_utf8_lossy(&farm.stderr),
            String::from_utf8_lossy(&local.stderr),
            "stderr through the farm differs ({args:?})"
        );
    }

    /// A counter of `kiln stats --json`.
    pub fn stat(p: &Project, name: &str) -> i64 {
        let s = p.stats();
        s[name]
            .as_i64()
            .unwrap_or_else(|| panic!("no {name} in {s}"))
    }
}
