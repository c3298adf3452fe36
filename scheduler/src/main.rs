//! `kiln-scheduler`: parses flags, starts tracing, binds the socket and serves; with
//! `--local-builder`, also runs a builder in the same process (the single-machine farm).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Places compile jobs from kiln clients on the builders that join it.
///
/// Start a secure farm with `kiln-scheduler init DIR`, which writes the certificates and tokens
/// and prints the command lines that use them.
#[derive(Debug, Parser)]
#[command(
    name = "kiln-scheduler",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on for clients and builders.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,
    /// Seconds between builder heartbeats; a builder silent for three is taken as lost.
    #[arg(long, default_value_t = 2)]
    heartbeat: u64,
    /// Memory for toolchains kept to hand to builders, like 2G.
    #[arg(long, default_value = "2G", value_parser = size)]
    toolchain_cache: u64,
    /// The server certificate (PEM, leaf first) for the gRPC port and --http.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A CA whose certificates identify builders (mutual TLS): a builder presenting one needs
    /// no token.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    builder_ca: Option<PathBuf>,
    /// The tokens clients present (lines of NAME HASH [jobs=N]); read again when it changes.
    #[arg(long, value_name = "FILE")]
    client_tokens: Option<PathBuf>,
    /// The tokens builders present, in the same form.
    #[arg(long, value_name = "FILE")]
    builder_tokens: Option<PathBuf>,
    /// Serve without TLS, or without tokens, where none are given. Logged as a warning: anyone
    /// who can reach the port can then run compilers on the builders.
    #[arg(long)]
    insecure: bool,
    /// Serve the dashboard and Prometheus metrics at ADDR (https with --tls-cert).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Logs on stderr for people (`human`) or as JSON lines (`json`); the level is KILN_LOG's.
    #[arg(long, default_value = "human", value_name = "FORMAT")]
    log_format: kiln_net::logging::LogFormat,
    /// A kiln-cache (https://HOST:PORT) whose hit rate the dashboard charts.
    #[arg(long, value_name = "URL")]
    cache: Option<String>,
    /// The CA that --cache's certificate chains to (default: the system's roots).
    #[arg(long, value_name = "FILE", requires = "cache")]
    cache_ca: Option<PathBuf>,
    /// A token for --cache, when it keeps reads private (--private).
    #[arg(long, value_name = "FILE", requires = "cache")]
    cache_token_file: Option<PathBuf>,
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

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Write a CA, certificates and tokens for a new farm into DIR, and print how to use them.
    Init {
        /// Where to write them (created if missing; existing files are never replaced).
        dir: PathBuf,
        /// Another host name or address the server certificate must cover: the one clients and
        /// builders dial. Repeat for each.
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
        /// Replace only server.pem and server.key in DIR, for the --name given now, signed with
        /// DIR/ca.key; the CA, builder certificate and tokens stay, so only the servers need
        /// the new files (and a restart).
        #[arg(long)]
        reissue_server: bool,
    },
    /// Make a new token: write it to OUT and add its hash to a tokens file.
    Token {
        /// The tokens file the scheduler reads (--client-tokens or --builder-tokens).
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
        /// Who holds it, one word (it appears in logs).
        #[arg(long)]
        name: String,
        /// Jobs a client holding it may have in flight.
        #[arg(long)]
        jobs: Option<u32>,
        /// Where to write the token (mode 0600; an existing file is not replaced).
        out: PathBuf,
    },
}

fn size(text: &str) -> Result<u64, String> {
    kiln_cache::parse_size(text)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Command::Init {
            dir,
            names,
            reissue_server: true,
        }) => {
            kiln_scheduler::init::reissue_server(dir, names)?;
            println!(
                "wrote a new {} and {} covering {}: give them to the scheduler and kiln-cache, \
                 and restart them",
                dir.join(kiln_scheduler::init::SERVER_CERT).display(),
                dir.join(kiln_scheduler::init::SERVER_KEY).display(),
                kiln_scheduler::init::server_names(names).join(", ")
            );
            return Ok(());
        }
        Some(Command::Init {
            dir,
            names,
            reissue_server: false,
        }) => {
            kiln_scheduler::init::farm(dir, names)?;
            println!("{}", kiln_scheduler::init::next_steps(dir, names));
            return Ok(());
        }
        Some(Command::Token {
            tokens,
            name,
            jobs,
            out,
        }) => {
            kiln_scheduler::init::add_token(tokens, name, *jobs, out)?;
            println!(
                "wrote {name}'s token to {}; {} accepts it from now on",
                out.display(),
                tokens.display()
            );
            return Ok(());
        }
        None => {}
    }
    kiln_net::logging::init_from_env(args.log_format);
    anyhow::ensure!(
        !args.local_builder || cfg!(feature = "local-builder"),
        "this kiln-scheduler was built without --local-builder (cargo feature local-builder): \
         run a kiln-builder beside it instead"
    );
    #[cfg(feature = "local-builder")]
    if args.local_builder {
        // Before any thread exists (see kiln-builder).
        if let Err(e) = kiln_jails::linux::private_mounts() {
            tracing::warn!("{e}; containers are mounted in the host's namespace");
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(args))
}

/// The scheduler's TLS and credentials from its flags: complete, or `--insecure` for what is
/// missing, with a warning for each gap.
fn security(args: &Args) -> anyhow::Result<(kiln_net::tls::Listen, kiln_scheduler::auth::Auth)> {
    let files = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| kiln_net::tls::ServerFiles {
            cert,
            key,
            client_ca: args.builder_ca.clone(),
        });
    let listen = kiln_net::tls::Listen::choose(files, args.insecure, "kiln-scheduler")?;
    let tokens = |path: &Option<PathBuf>| -> anyhow::Result<_> {
        Ok(match path {
            Some(p) => Some(std::sync::Arc::new(kiln_net::auth::Tokens::open(p)?)),
            None => None,
        })
    };
    let auth = kiln_scheduler::auth::Auth {
        client_tokens: tokens(&args.client_tokens)?,
        builder_tokens: tokens(&args.builder_tokens)?,
        builder_certs: args.builder_ca.is_some(),
        local_builder: None,
    };
    if auth.client_tokens.is_none() {
        anyhow::ensure!(
            args.insecure,
            "kiln-scheduler needs --client-tokens (kiln-scheduler init writes one), or \
             --insecure to take jobs from anyone who can reach it"
        );
        tracing::warn!(
            "no --client-tokens (--insecure): anyone who can reach the port may send jobs"
        );
    }
    if auth.builder_tokens.is_none() && !auth.builder_certs {
        anyhow::ensure!(
            args.insecure,
            "kiln-scheduler needs --builder-tokens or --builder-ca (kiln-scheduler init writes \
             both), or --insecure to let any builder join"
        );
        tracing::warn!(
            "no --builder-tokens or --builder-ca (--insecure): any builder may join and see jobs"
        );
    }
    Ok((listen, auth))
}

/// Connections the kernel may queue before the scheduler accepts them (it caps this at its
/// `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 8192;

/// Binds the gRPC listener with a deep accept queue: a whole fleet dials at once when the
/// scheduler (re)starts, and at tokio's default of 1,024 queued dials the rest of 5,000
/// builders had their connections dropped and retried seconds later (issue 17).
async fn bind_for_fleet(at: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(at).await? {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(ACCEPT_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("{at} names no address"),
        anyhow::Error::from,
    ))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = kiln_net::shutdown_signal();
    let (listen, mut auth) = security(&args)?;
    let listener = bind_for_fleet(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // The first line on stdout says where, so scripts and tests can start it on port 0.
    println!("kiln-scheduler: listening on {}://{addr}", listen.scheme());
    let mut listeners = vec![(listener, listen.clone())];
    // The in-process builder presents a token made now, over a plain-text loopback port of its
    // own when the main one has TLS (it holds no CA to verify the server certificate with).
    let local = if args.local_builder {
        let token = kiln_net::auth::generate();
        auth.local_builder = Some(kiln_net::auth::hash(&token));
        let url = match &listen {
            kiln_net::tls::Listen::Insecure => format!("http://{addr}"),
            kiln_net::tls::Listen::Tls(_) => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let url = format!("http://{}", l.local_addr()?);
                listeners.push((l, kiln_net::tls::Listen::Insecure));
                url
            }
        };
        Some((url, token))
    } else {
        None
    };
    let config = kiln_scheduler::Config {
        heartbeat: Duration::from_secs(args.heartbeat.max(1)),
        toolchain_cache: args.toolchain_cache,
        cache: args.cache.clone(),
        cache_tls: kiln_net::tls::ClientFiles {
            ca: args.cache_ca.clone(),
            identity: None,
        },
        cache_token: match &args.cache_token_file {
            Some(p) => kiln_net::auth::Credential::File(p.clone()),
            None => kiln_net::auth::Credential::None,
        },
        listen: listen.clone(),
        auth,
        ..kiln_scheduler::Config::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let builder = match local {
        Some((url, token)) => Some(local_builder(&args, url, token, stopped(stop_rx.clone()))?),
        None => None,
    };
    let http = match &args.http {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (--http)"))?;
            println!(
                "kiln-scheduler: dashboard on {}://{}/ and metrics at /metrics",
                listen.scheme(),
                l.local_addr()?
            );
            Some(l)
        }
        None => None,
    };
    let served = kiln_scheduler::serve_listeners(config, listeners, http, stopped(stop_rx));
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => r?,
        _ = shutdown => {
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

/// The builder `--local-builder` runs in this process, joined to `url` with `token`.
#[cfg(feature = "local-builder")]
fn local_builder(
    args: &Args,
    url: String,
    token: String,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<kiln_net::task::Owned<anyhow::Result<()>>> {
    let helper = match &args.jail_helper {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("kiln-jail"),
    };
    let work_dir = std::path::absolute(&args.work_dir)?;
    let mut config = kiln_builder::Config::new(&url, work_dir, helper);
    config.token = kiln_net::auth::Credential::Token(token);
    config.name = format!("{}-local", config.name);
    if let Some(slots) = args.slots {
        config.slots = slots.max(1);
    }
    Ok(kiln_net::task::spawn(
        "local builder",
        kiln_builder::serve(config, None, stopped),
    ))
}

#[cfg(not(feature = "local-builder"))]
fn local_builder(
    _: &Args,
    _: String,
    _: String,
    _: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<kiln_net::task::Owned<anyhow::Result<()>>> {
    anyhow::bail!("this kiln-scheduler was built without --local-builder")
}
