//! `kiln-builder`: parses flags, starts tracing, and runs the builder until interrupted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Runs compile jobs from a kiln scheduler inside jails made from each client's toolchain.
#[derive(Debug, Parser)]
#[command(name = "kiln-builder", version)]
struct Args {
    /// The scheduler to join, as http://HOST:PORT. The builder dials out; it needs no open port.
    #[arg(long, env = "KILN_SCHEDULER")]
    scheduler: String,
    /// The jail backend: `linux` (namespaces over overlayfs). `pot` (FreeBSD) is not built yet.
    #[arg(long, default_value = "linux")]
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
    /// Slot N runs jobs as uid and gid UID_BASE + N.
    #[arg(long, default_value_t = 61_000)]
    uid_base: u32,
}

/// `KILN_LOG=debug` and the like; info by default.
fn log_level() -> tracing::Level {
    std::env::var("KILN_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

fn size(text: &str) -> Result<u64, String> {
    kiln_cache::parse_size(text)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(log_level())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.jail != "linux" {
        anyhow::bail!(
            "--jail {}: only the `linux` backend is available in this build",
            args.jail
        );
    }
    // Mounts made from here on are this process's alone and vanish with it, even if it is killed.
    // Done before the runtime starts threads: a threaded process cannot unshare its mounts.
    if let Err(e) = kiln_jails::linux::private_mounts() {
        tracing::warn!("{e}; containers are mounted in the host's namespace");
    }
    let helper = match args.jail_helper {
        Some(p) => p,
        None => std::env::current_exe()
            .context("finding this program")?
            .with_file_name("kiln-jail"),
    };
    let work_dir = std::path::absolute(&args.work_dir).context("the work directory")?;
    let mut config = kiln_builder::Config::new(&args.scheduler, work_dir, helper);
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
    config.uid_base = args.uid_base;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(kiln_builder::serve(config, shutdown_signal()))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a fresh runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
