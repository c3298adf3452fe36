//! `kiln-cache --listen ADDR --dir DIR`: the shared cache server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_cache::{parse_size, Limits};
use kiln_cache_server::{serve, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "kiln-cache",
    version,
    about = "kiln's shared cache over HTTP: waf's wafcache (/files/), Bazel (/ac/, /cas/) and ccache (/ccache/)"
)]
struct Args {
    /// Address to listen on, such as 127.0.0.1:8080 or 0.0.0.0:8080.
    #[arg(long)]
    listen: String,
    /// The store's directory (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Size cap: least recently used entries go first (10G, 500M...).
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    max_size: u64,
    /// Logs on stderr for people (`human`) or as JSON lines (`json`); the level is KILN_LOG's.
    #[arg(long, default_value = "human", value_name = "FORMAT")]
    log_format: kiln_proto::logging::LogFormat,
    /// Entry-count cap, 0 for none.
    #[arg(long, default_value_t = 0)]
    max_files: u64,
    /// Seconds between trims of the whole store.
    #[arg(long, default_value_t = 60)]
    trim_interval: u64,
    /// Largest upload accepted (bigger ones get 413).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    max_body: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kiln_proto::logging::init(args.log_format, std::env::var("KILN_LOG").ok().as_deref());
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // The first line on stdout says where, so scripts and tests can start it on port 0.
    println!(
        "kiln-cache: listening on {} (store {})",
        listener.local_addr()?,
        args.dir.display()
    );
    let config = ServerConfig {
        dir: args.dir,
        limits: Limits {
            max_size: args.max_size,
            max_files: args.max_files,
        },
        trim_interval: Duration::from_secs(args.trim_interval.max(1)),
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
    };
    serve(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminate = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
