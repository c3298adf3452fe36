//! `kiln-builder`: parses flags, starts tracing, and runs the builder until interrupted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Runs compile jobs from a kiln scheduler inside jails made from each client's toolchain.
#[derive(Debug, Parser)]
#[command(name = "kiln-builder", version)]
struct Args {
    /// The scheduler to join, as https://HOST:PORT (http:// only with --insecure). The builder
    /// dials out; it needs no open port.
    #[arg(long, env = "KILN_SCHEDULER")]
    scheduler: String,
    /// The CA the scheduler's certificate must chain to (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A file holding this builder's token, listed in the scheduler's --builder-tokens. It is
    /// read at each connection, so replacing the file rotates the token.
    #[arg(long, value_name = "FILE", env = "KILN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// This builder's certificate (PEM): presented to the scheduler, which accepts it instead
    /// of a token if its --builder-ca signed it. It authenticates a client only (the builder
    /// certificate `kiln-scheduler init` writes cannot serve), so --http has its own.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain text: an http:// scheduler, --http without TLS, no token. Logged as a warning.
    #[arg(long)]
    insecure: bool,
    /// The jail backend: `linux` (namespaces over overlayfs) or `pot` (FreeBSD jails managed by
    /// pot, see docs/freebsd.md).
    #[arg(long, default_value = DEFAULT_JAIL, value_parser = ["linux", "pot"])]
    jail: String,
    /// Jobs at once (default: the number of CPUs).
    #[arg(long)]
    slots: Option<u32>,
    /// Where toolchains, input files and containers live.
    #[arg(long)]
    work_dir: PathBuf,
    /// How this builder appears in `kiln dist-status` (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// The kiln-jail helper (default: beside this program).
    #[arg(long)]
    jail_helper: Option<PathBuf>,
    /// Disk for toolchain archives, like 10G.
    #[arg(long, default_value = "10G", value_parser = size)]
    toolchain_cache: u64,
    /// Disk for input files kept by digest.
    #[arg(long, default_value = "10G", value_parser = size)]
    input_cache: u64,
    /// Wall-clock limit per job, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Memory per job, like 4G.
    #[arg(long, default_value = "4G", value_parser = size)]
    memory: u64,
    /// Disk per job, like 4G: everything it writes, its outputs and /tmp included. A job that
    /// fills it fails with "disk limit" and its client compiles locally.
    #[arg(long, default_value = "4G", value_parser = size)]
    disk: u64,
    /// The most a toolchain archive may expand to when unpacked: a bigger one (a gzip bomb) is
    /// refused as soon as it passes this.
    #[arg(long, default_value = "4G", value_parser = size)]
    max_toolchain_unpacked: u64,
    /// Logs on stderr for people (`human`) or as JSON lines (`json`); the level is KILN_LOG's.
    #[arg(long, default_value = "human", value_name = "FORMAT")]
    log_format: kiln_net::logging::LogFormat,
    /// Serve Prometheus metrics at https://ADDR/metrics with --http-tls-cert (http:// with
    /// --insecure); the builder needs no open port otherwise.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// The server certificate (PEM) --http serves, naming this builder's host as scrapers dial
    /// it and allowing server authentication.
    #[arg(long, value_name = "FILE", requires_all = ["http_tls_key", "http"])]
    http_tls_cert: Option<PathBuf>,
    /// The private key of --http-tls-cert.
    #[arg(long, value_name = "FILE", requires = "http_tls_cert")]
    http_tls_key: Option<PathBuf>,
    /// Slot N runs jobs as uid and gid UID_BASE + N (Linux jails).
    #[arg(long, default_value_t = 61_000)]
    uid_base: u32,
    #[command(flatten)]
    pot: PotArgs,
}

/// The backend the host offers.
const DEFAULT_JAIL: &str = if cfg!(target_os = "freebsd") {
    "pot"
} else {
    "linux"
};

/// Settings of `--jail pot`; the defaults match a stock pot installation.
#[derive(Debug, clap::Args)]
struct PotArgs {
    /// pot: the `pot` program.
    #[arg(long = "pot")]
    pot_program: Option<PathBuf>,
    /// pot: the `jexec` program.
    #[arg(long)]
    jexec: Option<PathBuf>,
    /// pot: the `rctl` program that limits each jail's memory, processes and open files, or
    /// `none` to leave limits to the template (rctl needs kern.racct.enable=1).
    #[arg(long)]
    rctl: Option<String>,
    /// pot: the template pot images are cloned from (default kiln-template).
    #[arg(long)]
    pot_template: Option<String>,
    /// pot: pot's POT_FS_ROOT, where `jails/NAME/m` lives (default /opt/pot).
    #[arg(long)]
    pot_fs_root: Option<PathBuf>,
    /// pot: an extra argument for every `pot clone`; repeat for each, as in
    /// `--pot-clone-arg=-d --pot-clone-arg=off`.
    #[arg(long = "pot-clone-arg", allow_hyphen_values = true)]
    pot_clone_args: Vec<String>,
    /// pot: the prefix of this builder's pot names (default kiln-); pots with it are destroyed
    /// at start-up, so give each builder on a host its own.
    #[arg(long)]
    pot_prefix: Option<String>,
    /// pot: the user, in the template, that runs every job (default kiln).
    #[arg(long)]
    pot_user: Option<String>,
}

impl PotArgs {
    fn config(self) -> kiln_jails::pot::PotConfig {
        let mut c = kiln_jails::pot::PotConfig::default();
        c.pot = self.pot_program.unwrap_or(c.pot);
        c.jexec = self.jexec.unwrap_or(c.jexec);
        match self.rctl.as_deref() {
            Some("none") => c.rctl = None,
            Some(path) => c.rctl = Some(path.into()),
            None => {}
        }
        c.template = self.pot_template.unwrap_or(c.template);
        c.fs_root = self.pot_fs_root.unwrap_or(c.fs_root);
        c.clone_args = self.pot_clone_args;
        c.prefix = self.pot_prefix.unwrap_or(c.prefix);
        c.user = self.pot_user.unwrap_or(c.user);
        c
    }
}

/// `KILN_LOG=debug` and the like; info by default.
fn size(text: &str) -> Result<u64, String> {
    kiln_cache::parse_size(text)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kiln_net::logging::init_from_env(args.log_format);
    if args.jail == "linux" {
        // Without root, the builder is root in a user namespace of its own (rootless mode).
        // Done before the runtime starts threads: a threaded process can unshare neither its
        // user namespace nor its mounts.
        #[cfg(target_os = "linux")]
        if !kiln_jails::linux::is_real_root() {
            kiln_jails::linux::enter_user_namespace()
                .context("running without root needs a user namespace")?;
            tracing::info!(
                "rootless mode: jobs run as this user in user namespaces of their own; \
                 memory is limited per process (RLIMIT_AS) unless a memory cgroup is delegated"
            );
        }
        // Mounts made from here on are this process's alone and vanish with it, even if it is
        // killed.
        if let Err(e) = kiln_jails::linux::private_mounts() {
            tracing::warn!("{e}; containers are mounted in the host's namespace");
        }
    }
    let helper = match args.jail_helper {
        Some(p) => p,
        None => std::env::current_exe()
            .context("finding this program")?
            .with_file_name("kiln-jail"),
    };
    let work_dir = std::path::absolute(&args.work_dir).context("the work directory")?;
    let mut config = kiln_builder::Config::new(&args.scheduler, work_dir, helper);
    let identity = args.tls_cert.clone().zip(args.tls_key.clone());
    if !args.scheduler.starts_with("https://") {
        anyhow::ensure!(
            args.insecure,
            "--scheduler {} is not https://: give the scheduler's https:// address, or add \
             --insecure to join a plain-text farm",
            args.scheduler
        );
        tracing::warn!("joining the scheduler in plain text (--insecure)");
    }
    match &args.token_file {
        Some(path) => {
            // Read now so a missing file is an error at start-up, not a retry loop.
            kiln_net::auth::read_token(path).map_err(anyhow::Error::msg)?;
            config.token = kiln_net::auth::Credential::File(path.clone());
        }
        None => anyhow::ensure!(
            identity.is_some() || args.insecure,
            "kiln-builder needs --token-file (a builder token) or --tls-cert and --tls-key (a \
             certificate the scheduler's --builder-ca signed), or --insecure for a farm without \
             credentials"
        ),
    }
    config.tls = kiln_net::tls::ClientFiles {
        ca: args.ca.clone(),
        identity,
    };
    // Checked now, with the file named, rather than at every dial.
    kiln_net::tls::endpoint(&config.scheduler, &config.tls)?;
    if args.jail == "pot" {
        config.jail = kiln_builder::JailKind::Pot(args.pot.config());
    }
    if let Some(slots) = args.slots {
        anyhow::ensure!(slots > 0, "--slots must be at least 1");
        config.slots = slots;
    }
    if let Some(name) = args.name {
        config.name = name;
    }
    config.toolchain_cache = args.toolchain_cache;
    config.input_cache = args.input_cache;
    config.limits.timeout = Duration::from_secs(args.timeout.max(1));
    config.limits.memory = args.memory;
    config.limits.disk = args.disk;
    config.limits.toolchain_unpacked = args.max_toolchain_unpacked;
    config.uid_base = args.uid_base;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = kiln_net::shutdown_signal();
        let http = match &args.http {
            Some(at) => {
                let files = args
                    .http_tls_cert
                    .clone()
                    .zip(args.http_tls_key.clone())
                    .map(|(cert, key)| kiln_net::tls::ServerFiles {
                        cert,
                        key,
                        client_ca: None,
                    });
                anyhow::ensure!(
                    files.is_some() || args.insecure,
                    "kiln-builder --http needs --http-tls-cert and --http-tls-key (a server \
                     certificate for this host's name), or --insecure to serve metrics in plain \
                     text"
                );
                let listen =
                    kiln_net::tls::Listen::choose(files, args.insecure, "kiln-builder --http")?;
                let l = tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen on {at} (--http)"))?;
                tracing::info!(
                    "metrics on {}://{}/metrics",
                    listen.scheme(),
                    l.local_addr()?
                );
                Some((l, listen))
            }
            None => None,
        };
        kiln_builder::serve(config, http, shutdown).await
    })
}
