//! `kiln-scheduler`: parses flags, starts tracing, binds the socket and serves; with
//! `--local-builder`, also runs a builder in the same process (the single-machine farm).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Places compile jobs from kiln clients on the builders that join it.
#[derive(Debug, Parser)]
#[command(name = "kiln-scheduler", version)]
struct Args {
    /// Address to listen on for clients and builders.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,
    /// Seconds between builder heartbeats; a builder silent for three is taken as lost.
    #[arg(long, default_value_t = 2)]
    heartbeat: u64,
    /// Memory for toolchains kept to hand to builders, like 2G.
    #[arg(long, default_value = "2G", value_parser = size)]
    toolchain_cache: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Logs on stderr for people (`human`) or as JSON lines (`json`); the level is KILN_LOG's.
    #[arg(long, default_value = "human", value_name = "FORMAT")]
    log_format: kiln_proto::logging::LogFormat,
    /// A kiln-cache (http://HOST:PORT) whose hit rate the dashboard charts.
    #[arg(long, value_name = "URL")]
    cache: Option<String>,
    /// Also run a builder in this process, joined to this scheduler.
    #[arg(long)]
    local_builder: bool,
    /// The local builder's work directory.
    #[arg(long, default_value = "/var/tmp/kiln-builder")]
    work_dir: PathBuf,
    /// The local builder's slots (default: the number of CPUs).
    #[arg(long)]
    slots: Option<u32>,
    /// The kiln-jail helper for the local builder (default: beside this program).
    #[arg(long)]
    jail_helper: Option<PathBuf>,
}

fn size(text: &str) -> Result<u64, String> {
    kiln_cache::parse_size(text)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kiln_proto::logging::init(args.log_format, std::env::var("KILN_LOG").ok().as_deref());
    if args.local_builder {
        // Before any thread exists (see kiln-builder).
        if let Err(e) = kiln_jails::linux::private_mounts() {
            tracing::warn!("{e}; containers are mounted in the host's namespace");
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // The first line on stdout says where, so scripts and tests can start it on port 0.
    println!("kiln-scheduler: listening on {addr}");
    let config = kiln_scheduler::Config {
        heartbeat: Duration::from_secs(args.heartbeat.max(1)),
        toolchain_cache: args.toolchain_cache,
        cache: args.cache.clone(),
        ..kiln_scheduler::Config::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let builder = if args.local_builder {
        let helper = match args.jail_helper {
            Some(p) => p,
            None => std::env::current_exe()?.with_file_name("kiln-jail"),
        };
        let work_dir = std::path::absolute(&args.work_dir)?;
        let mut config = kiln_builder::Config::new(&format!("http://{addr}"), work_dir, helper);
        config.name = format!("{}-local", config.name);
        if let Some(slots) = args.slots {
            config.slots = slots.max(1);
        }
        Some(tokio::spawn(kiln_builder::serve(
            config,
            None,
            stopped(stop_rx.clone()),
        )))
    } else {
        None
    };
    let http = match &args.http {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (--http)"))?;
            println!(
                "kiln-scheduler: metrics on http://{}/metrics",
                l.local_addr()?
            );
            Some(l)
        }
        None => None,
    };
    let served = kiln_scheduler::serve(config, listener, http, stopped(stop_rx));
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => r?,
        _ = shutdown_signal() => {
            let _ = stop_tx.send(true);
            served.await?;
        }
    }
    let _ = stop_tx.send(true);
    if let Some(builder) = builder {
        builder.await??;
    }
    Ok(())
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
