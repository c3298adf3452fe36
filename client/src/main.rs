//! `kiln`: wrap one compile (`kiln gcc -c foo.c`), or manage the cache (`kiln stats`).
//!
//! This file parses kiln's own command line and the configuration, then hands over to the
//! library. Called through a link named like a compiler (`gcc -> kiln`), kiln wraps that
//! compiler.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_cache::{Limits, Store};
use kiln_client::compile::{self, Invocation};
use kiln_client::config::{Config, Overrides};
use kiln_client::env::Env;
use kiln_client::{compiler, stats};

const ABOUT: &str = "kiln: a compiler cache. Put it in front of gcc or clang.";

const AFTER_HELP: &str = "\
Wrapping a compile:
  kiln [--recache] [--disable] [--dist] COMPILER ARGS...   e.g. kiln gcc -c foo.c -o foo.o
  CC=\"kiln gcc\" make, or CMAKE_C_COMPILER_LAUNCHER=kiln, or a link named gcc pointing to kiln.

Configuration: a TOML file (KILN_CONFIG, default ~/.config/kiln/kiln.toml), overridden by
KILN_* variables, overridden by flags; kiln config shows each value and where it came from.
  KILN_DIR            the cache directory (default ~/.cache/kiln)
  KILN_CACHE_SIZE     size cap, e.g. 500M, 20G (default 10G; 0 for no limit)
  KILN_CACHE_FILES    entry-count cap (default none)
  KILN_BASE_DIR, KILN_HASH_DIR, KILN_DISABLE, KILN_READONLY, KILN_RECACHE, KILN_STATS
  KILN_REMOTE_CACHE   the shared cache: a kiln-cache, https://HOST:PORT, or any REAPI cache
                      (bazel-remote, BuildBuddy, BuildGrid...), grpcs://HOST:PORT (grpc://
                      without TLS), with KILN_REMOTE_INSTANCE its instance name;
                      KILN_NO_PUSH, KILN_REMOTE_ASYNC
  KILN_SCHEDULER      the farm's scheduler, https://HOST:PORT (http:// only for a scheduler
                      run --insecure)
  KILN_DIST=1         compile misses on the farm (or --dist)
  KILN_AGENT=0        each compile connects to the scheduler itself, instead of sharing the
                      connection of a per-user agent kiln starts on demand (kiln agent)
  KILN_CA_FILE        the CA the scheduler's and remote cache's certificates chain to
                      (default: the system's roots)
  KILN_TOKEN_FILE     a file holding the client token for the scheduler and remote cache
  KILN_CROSS_CHECK    share of farm results compiled again here and compared, e.g. 0.01
  KILN_LOG            debug explains each hit and miss on stderr (kiln's own messages;
                      a filter such as debug,h2=trace adds the network libraries')
The farm: kiln dist-status shows the builders. kiln toolchain package COMPILER OUT writes the
archive a builder runs COMPILER from, and prints its digest and size.
Go: GOCACHEPROG=\"kiln go-cacheprog\".";

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what kiln did: hits, misses, uncacheable compiles by reason, cache size.
    Stats {
        /// Print a JSON document.
        #[arg(long)]
        json: bool,
        /// Reset the counters to zero.
        #[arg(long)]
        zero: bool,
    },
    /// Show the configuration in effect and where it came from.
    Config,
    /// Evict entries down to the size limits now, and sweep files of interrupted writers.
    Cleanup,
    /// Remove every cached result.
    Clear,
    /// Show the compile farm: builders (with their ids when two share a name), their slots,
    /// load, toolchains and health, and jobs in flight.
    DistStatus {
        /// Print a JSON document (with a `builders` list).
        #[arg(long)]
        json: bool,
    },
    /// Serve Go's build cache: GOCACHEPROG="kiln go-cacheprog" (Go 1.24 and later).
    GoCacheprog,
    /// Make DIR a masquerade directory: links named gcc, g++, cc, c++, clang and clang++ to
    /// kiln, for each compiler found in PATH (existing files are left alone). Put DIR first in
    /// PATH and every build tool's compiler calls go through kiln.
    Masquerade { dir: std::path::PathBuf },
    /// Toolchain archives: the compiler as the farm's builders run it.
    Toolchain {
        #[command(subcommand)]
        command: ToolchainCommand,
    },
    /// Serve the per-user agent in the foreground: one warm connection to the farm's scheduler
    /// that compiles share instead of each paying for its own. Compiles with --dist start it
    /// on demand (KILN_AGENT=0 turns that off), and it exits when unused.
    Agent {
        /// The socket to serve (default: the one compiles of this configuration look for).
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
        /// Exit after this many seconds without a compile.
        #[arg(long, default_value_t = kiln_client::agent::IDLE.as_secs())]
        idle: u64,
    },
    /// Upload a stored result and its manifest to the remote cache; kiln runs this itself, in
    /// the background, with KILN_REMOTE_ASYNC=1.
    #[command(hide = true)]
    RemotePush {
        #[arg(long)]
        manifest: kiln_cache::Digest,
        #[arg(long)]
        result: kiln_cache::Digest,
    },
}

#[derive(Subcommand, Debug)]
enum ToolchainCommand {
    /// Pack COMPILER (a path, or a name looked up in PATH) with what it needs to compile into
    /// the archive OUT, and print its digest and size.
    Package {
        compiler: std::path::PathBuf,
        out: std::path::PathBuf,
    },
}

const SUBCOMMANDS: &[&str] = &[
    "stats",
    "config",
    "cleanup",
    "clear",
    "go-cacheprog",
    "dist-status",
    "toolchain",
    "masquerade",
    "remote-push",
    "agent",
    "help",
    "--help",
    "-h",
    "--version",
    "-V",
];

fn main() -> ExitCode {
    let env = Env::capture();
    init_logging(&env);
    let argv: Vec<OsString> = std::env::args_os().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A masquerade link is named like a compiler (`gcc -> kiln`); kiln itself may be renamed
    // (`kiln-0.1`), but no compiler is called kiln-something.
    let code = if !invoked_as.starts_with("kiln") && !invoked_as.is_empty() {
        // A masquerade link: `gcc -> kiln`.
        wrap(
            &env,
            &invoked_as,
            argv[1..].to_vec(),
            Overrides::default(),
            true,
        )
    } else {
        match argv.get(1).and_then(|a| a.to_str()) {
            None => {
                eprintln!(
                    "kiln: no compiler given\n\nUsage: kiln COMPILER ARGS...   (see kiln --help)"
                );
                2
            }
            Some(first) if SUBCOMMANDS.contains(&first) => subcommand(&env, Cli::parse_from(&argv)),
            Some(_) => {
                let mut flags = Overrides::default();
                let mut rest = argv[1..].iter();
                let compiler = loop {
                    match rest.next().and_then(|a| a.to_str()) {
                        Some("--recache") => flags.recache = Some(true),
                        Some("--disable") => flags.disable = Some(true),
                        Some("--dist") => flags.dist = Some(true),
                        Some(other) if other.starts_with("--") => {
                            eprintln!("kiln: unknown option {other:?} before the compiler (see kiln --help)");
                            return ExitCode::from(2);
                        }
                        Some(c) => break c.to_owned(),
                        None => {
                            eprintln!("kiln: no compiler given (see kiln --help)");
                            return ExitCode::from(2);
                        }
                    }
                };
                wrap(&env, &compiler, rest.cloned().collect(), flags, false)
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(env: &Env) {
    kiln_client::log::init(env.get("KILN_LOG"));
}

/// Wraps one compile. Never fails the build for kiln's own sake: when the configuration or the
/// cache is unusable, the compiler runs directly.
fn wrap(
    env: &Env,
    compiler_name: &str,
    args: Vec<OsString>,
    flags: Overrides,
    masquerade: bool,
) -> i32 {
    let self_exe = std::env::current_exe().unwrap_or_else(|_| "kiln".into());
    let compiler = match compiler::find(compiler_name, env, &self_exe) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            return 127;
        }
    };
    let config = match Config::load(env, &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: warning: {e:#}; compiling without the cache");
            let err = kiln_client::process::exec(&compiler, &args);
            eprintln!("kiln: cannot run {}: {err}", compiler.display());
            return 127;
        }
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(_) => {
            let err = kiln_client::process::exec(&compiler, &args);
            eprintln!("kiln: cannot run {}: {err}", compiler.display());
            return 127;
        }
    };
    if masquerade && config.stats && !config.disable {
        kiln_client::masquerade::note_missing(&config.dir, compiler_name, env, &self_exe);
    }
    use std::io::IsTerminal;
    let inv = Invocation {
        config: &config,
        env,
        cwd,
        compiler,
        args,
        stderr_tty: std::io::stderr().is_terminal(),
    };
    compile::run(&inv)
}

fn subcommand(env: &Env, cli: Cli) -> i32 {
    match run_subcommand(env, cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            1
        }
    }
}

/// `kiln config`: every setting in effect, and the layer it came from (default, file, the
/// environment variable, or a flag).
fn config_text(config: &Config) -> String {
    let path = |p: &Option<std::path::PathBuf>, none: &str| {
        p.as_ref()
            .map_or(none.to_string(), |p| p.display().to_string())
    };
    let text = |t: &Option<String>| t.clone().unwrap_or_else(|| "(none)".into());
    let rows: Vec<(&str, String)> = vec![
        ("dir", config.dir.display().to_string()),
        (
            "max_size",
            if config.max_size == 0 {
                "no limit".into()
            } else {
                stats::human_bytes(config.max_size)
            },
        ),
        (
            "max_files",
            if config.max_files == 0 {
                "no limit".into()
            } else {
                config.max_files.to_string()
            },
        ),
        ("base_dir", path(&config.base_dir, "(none)")),
        ("hash_dir", config.hash_dir.to_string()),
        ("read_only", config.read_only.to_string()),
        ("recache", config.recache.to_string()),
        ("disable", config.disable.to_string()),
        ("stats", config.stats.to_string()),
        ("remote_cache", text(&config.remote_cache)),
        ("remote_instance", text(&config.remote_instance)),
        ("no_push", config.no_push.to_string()),
        ("remote_async", config.remote_async.to_string()),
        ("dist", config.dist.to_string()),
        ("agent", config.agent.to_string()),
        ("scheduler", text(&config.scheduler)),
        ("ca_file", path(&config.ca_file, "(the system's roots)")),
        // The token's file, never the token.
        ("token_file", path(&config.token_file, "(none)")),
        ("cross_check", config.cross_check.to_string()),
    ];
    let mut out = format!(
        "{:<19} {}\n",
        "configuration file",
        path(&config.source, "(none)")
    );
    for (name, value) in rows {
        out.push_str(&format!(
            "{name:<19} {value:<40} ({})\n",
            config.origin(name)
        ));
    }
    out
}

fn run_subcommand(env: &Env, cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(env, &Overrides::default())?;
    let limits = Limits {
        max_size: config.max_size,
        max_files: config.max_files,
    };
    let store = Store::open(&config.dir, limits);
    match cli.command {
        Command::Stats { json, zero } => {
            if zero {
                stats::zero(&config.dir).with_context(|| {
                    format!("cannot reset statistics in {}", config.dir.display())
                })?;
                if !json {
                    println!("Statistics zeroed.");
                    return Ok(());
                }
            }
            let doc = stats::to_json(&stats::load(&config.dir), &store, limits);
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", stats::to_text(&doc));
                let self_exe = std::env::current_exe().unwrap_or_else(|_| "kiln".into());
                if let Some(hint) = kiln_client::masquerade::hint(&config.dir, &self_exe) {
                    print!("\n{hint}");
                }
            }
        }
        Command::Config => print!("{}", config_text(&config)),
        Command::Cleanup => {
            let r = store
                .cleanup()
                .with_context(|| format!("cannot clean {}", config.dir.display()))?;
            println!(
                "Evicted {} entries, removed {} leftover temporary files; {} in {} entries remain.",
                r.evicted,
                r.stale_tmp,
                stats::human_bytes(r.size),
                r.files
            );
        }
        Command::DistStatus { json } => {
            let farm = kiln_client::dist::Farm::from_config(&config)
                .context("no scheduler is configured: set KILN_SCHEDULER=https://HOST:PORT")?;
            let status =
                kiln_client::dist::status(&farm).map_err(
                    |e| match kiln_net::tls::handshake_hint(&e.to_string()) {
                        Some(hint) => e.context(hint),
                        None => e,
                    },
                )?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&kiln_client::dist::status_json(&status))?
                );
            } else {
                print!("{}", kiln_client::dist::status_text(&status));
            }
        }
        Command::Agent { socket, idle } => {
            let farm = kiln_client::dist::Farm::from_config(&config)
                .context("no scheduler is configured: set KILN_SCHEDULER=https://HOST:PORT")?;
            let socket = socket
                .or_else(|| kiln_client::agent::socket(&config.dir, &farm))
                .with_context(|| {
                    format!(
                        "the agent's socket under {} would be too long a path for a Unix \
                         socket: give --socket, or a shorter KILN_DIR",
                        config.dir.display()
                    )
                })?;
            kiln_client::agent::serve(&socket, &farm, std::time::Duration::from_secs(idle))?;
        }
        Command::GoCacheprog => {
            let counts = kiln_client::gocache::serve(
                &config,
                std::io::stdin().lock(),
                std::io::stdout().lock(),
            )?;
            if config.stats {
                stats::record_go(&config.dir, counts);
                stats::record_remote(&config.dir, counts.remote);
            }
        }
        Command::RemotePush { manifest, result } => {
            if let Some(remote) = kiln_client::remote::Remote::from_config(&config) {
                let mut counts = kiln_client::remote::Counts::default();
                kiln_client::compile::push_entries(
                    &store,
                    &remote,
                    &mut counts,
                    &manifest,
                    &result,
                );
                if config.stats {
                    stats::record_remote(&config.dir, counts);
                }
            }
        }
        Command::Toolchain { command } => match command {
            ToolchainCommand::Package {
                compiler: name,
                out,
            } => {
                let self_exe = std::env::current_exe().unwrap_or_else(|_| "kiln".into());
                let path = compiler::find(&name.to_string_lossy(), env, &self_exe)?;
                let t = kiln_client::toolchain::package(&path, &out)?;
                println!("toolchain           {}", t.archive.display());
                println!("digest              {}", t.digest);
                println!(
                    "size                {} ({} bytes)",
                    stats::human_bytes(t.size),
                    t.size
                );
            }
        },
        Command::Masquerade { dir } => {
            let self_exe = std::env::current_exe().context("cannot find kiln's own path")?;
            let done = kiln_client::masquerade::create(&dir, &self_exe, env)?;
            let list = |names: &[String]| names.join(" ");
            if !done.linked.is_empty() {
                println!("linked              {}", list(&done.linked));
            }
            if !done.present.is_empty() {
                println!("already linked      {}", list(&done.present));
            }
            if !done.no_compiler.is_empty() {
                println!("not in PATH         {}", list(&done.no_compiler));
            }
            if !done.occupied.is_empty() {
                println!(
                    "left alone          {} (files that are not kiln)",
                    list(&done.occupied)
                );
            }
            println!(
                "Put {} first in PATH: export PATH={}:$PATH",
                dir.display(),
                dir.display()
            );
        }
        Command::Clear => {
            let n = store
                .clear()
                .with_context(|| format!("cannot clear {}", config.dir.display()))?;
            println!("Removed {n} entries from {}.", config.dir.display());
        }
    }
    Ok(())
}
