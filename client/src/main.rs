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
KILN_* variables (KILN_DIR, KILN_CACHE_SIZE, KILN_BASE_DIR, KILN_DISABLE, KILN_READONLY,
KILN_RECACHE, KILN_HASH_DIR, KILN_STATS, KILN_REMOTE_CACHE, KILN_NO_PUSH, KILN_DIST,
KILN_SCHEDULER), overridden by flags.
The farm: KILN_SCHEDULER=http://HOST:PORT and --dist (or KILN_DIST=1) compile misses on a
builder; kiln dist-status shows the builders. kiln toolchain package COMPILER OUT writes the
archive a builder runs COMPILER from, and prints its digest and size.
Go: GOCACHEPROG=\"kiln go-cacheprog\". KILN_LOG=debug explains each
hit and miss on stderr.";

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
    /// Show the compile farm: builders, their slots, load and toolchains, and jobs in flight.
    DistStatus {
        /// Print a JSON document (with a `builders` list).
        #[arg(long)]
        json: bool,
    },
    /// Serve Go's build cache: GOCACHEPROG="kiln go-cacheprog" (Go 1.24 and later).
    GoCacheprog,
    /// Toolchain archives: the compiler as the farm's builders run it.
    Toolchain {
        #[command(subcommand)]
        command: ToolchainCommand,
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
    "remote-push",
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
        wrap(&env, &invoked_as, argv[1..].to_vec(), Overrides::default())
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
                wrap(&env, &compiler, rest.cloned().collect(), flags)
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
fn wrap(env: &Env, compiler_name: &str, args: Vec<OsString>, flags: Overrides) -> i32 {
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
            }
        }
        Command::Config => {
            println!(
                "configuration file  {}",
                config
                    .source
                    .as_ref()
                    .map_or("(none)".into(), |p| p.display().to_string())
            );
            println!("dir                 {}", config.dir.display());
            println!(
                "max_size            {}",
                stats::human_bytes(config.max_size)
            );
            println!(
                "max_files           {}",
                if config.max_files == 0 {
                    "no limit".into()
                } else {
                    config.max_files.to_string()
                }
            );
            println!(
                "base_dir            {}",
                config
                    .base_dir
                    .as_ref()
                    .map_or("(none)".into(), |p| p.display().to_string())
            );
            println!("hash_dir            {}", config.hash_dir);
            println!("read_only           {}", config.read_only);
            println!("recache             {}", config.recache);
            println!("disable             {}", config.disable);
            println!("stats               {}", config.stats);
            println!("dist                {}", config.dist);
            println!(
                "scheduler           {}",
                config.scheduler.as_deref().unwrap_or("(none)")
            );
            println!(
                "remote_cache        {}",
                config.remote_cache.as_deref().unwrap_or("(none)")
            );
            let path = |p: &Option<std::path::PathBuf>, none: &str| {
                p.as_ref()
                    .map_or(none.to_string(), |p| p.display().to_string())
            };
            println!(
                "ca_file             {}",
                path(&config.ca_file, "(the system's roots)")
            );
            // The token's file, never the token.
            println!("token_file          {}", path(&config.token_file, "(none)"));
            println!("cross_check         {}", config.cross_check);
        }
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
            let status = kiln_client::dist::status(&farm)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&kiln_client::dist::status_json(&status))?
                );
            } else {
                print!("{}", kiln_client::dist::status_text(&status));
            }
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
        Command::Clear => {
            let n = store
                .clear()
                .with_context(|| format!("cannot clear {}", config.dir.display()))?;
            println!("Removed {n} entries from {}.", config.dir.display());
        }
    }
    Ok(())
}
