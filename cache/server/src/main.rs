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
    about = "kiln's shared cache: gRPC for kiln clients, and HTTP for waf's wafcache (/files/), Bazel (/ac/, /cas/) and ccache (/ccache/), on one port"
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
    log_format: kiln_net::logging::LogFormat,
    /// Entry-count cap, 0 for none.
    #[arg(long, default_value_t = 0)]
    max_files: u64,
    /// Seconds between trims of the whole store.
    #[arg(long, default_value_t = 60)]
    trim_interval: u64,
    /// The server certificate (PEM, leaf first); `kiln-scheduler init` writes one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The tokens that may write (lines of NAME HASH, as the scheduler's --client-tokens); read
    /// again when it changes.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Reading needs a token too.
    #[arg(long, requires = "tokens")]
    private: bool,
    /// Let this protocol read and write without a token, for clients that cannot send one
    /// (waf's wafcache cannot). Repeat for each.
    #[arg(long, value_name = "PROTOCOL", value_parser = ["waf", "bazel", "ccache"])]
    anonymous: Vec<String>,
    /// Serve in plain text, or let anyone write, where no TLS or --tokens is given. Logged as a
    /// warning.
    #[arg(long)]
    insecure: bool,
    /// Largest upload accepted (bigger ones get 413).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    max_body: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shutdown = kiln_net::shutdown_signal();
    kiln_net::logging::init_from_env(args.log_format);
    let files = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| kiln_net::tls::ServerFiles {
            cert,
            key,
            client_ca: None,
        });
    let listen = kiln_net::tls::Listen::choose(files, args.insecure, "kiln-cache")?;
    let tokens = match &args.tokens {
        Some(path) => Some(std::sync::Arc::new(kiln_net::auth::Tokens::open(path)?)),
        None => {
            anyhow::ensure!(
                args.insecure,
                "kiln-cache needs --tokens (the clients that may write; kiln-scheduler init \
                 writes client-tokens), or --insecure to let anyone write"
            );
            tracing::warn!(
                "no --tokens (--insecure): anyone who can reach the port may write entries"
            );
            None
        }
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // The first line on stdout says where, so scripts and tests can start it on port 0.
    println!(
        "kiln-cache: listening on {}://{} (store {})",
        listen.scheme(),
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
        listen,
        tokens,
        private: args.private,
        anonymous: args.anonymous,
    };
    serve(config, listener, shutdown).await
}
