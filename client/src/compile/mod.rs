//! One wrapped compile: the flow every compiler family goes through.
//!
//! The flow, and what each step guarantees:
//! 1. The family prepares the compile ([`Family::prepare`]): it classifies the command
//!    ([`crate::args`] for C and C++) and computes the *manifest key* ([`key`]), which hashes
//!    the compiler's identity, the arguments that matter, the source and the environment that
//!    changes the output. Anything uncacheable runs the real compiler in place of kiln
//!    (`exec`), unchanged.
//! 2. The tiers ([`tiers`]) are asked: the local store, then the remote one. The manifest
//!    found under the key lists, per earlier result, the inputs used with their digests and the
//!    paths that must stay absent ([`shadow`]).
//! 3. A hit writes the outputs atomically and replays stdout and stderr.
//! 4. A miss runs the compiler once, on the farm with `--dist` ([`farm`]: distribute,
//!    cross-check) or here. The C family adds `-MD -MF <tmp>` when the user asked for no
//!    dependency file, so kiln learns every header without a second preprocessor pass. The
//!    inputs are hashed after the compile ([`store`]); if any changed during it, nothing is
//!    stored. "During" is decided against a [`files::Mark`] stamped just before the compile, so
//!    a header generated an instant before it is still cached.
//! 5. What happened is counted once, when the compile ends ([`Tally`]).
//!
//! A failure of kiln itself never fails the build: before the compile it falls back to running
//! the compiler directly, after it the compile's own result stands.
//!
//! What is particular to a compiler family (how its command is read, what its key covers,
//! which files it reads and writes) is behind [`Family`]; [`c_family`] is C, C++ and
//! Objective-C through gcc and clang. A second family (rustc) implements the trait and runs
//! through the same flow.

mod c_family;
mod farm;
mod key;
mod shadow;
mod store;
mod tiers;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use kiln_cache::{Digest, Limits, Store};

use crate::args::Reason;
use crate::config::Config;
use crate::dist;
use crate::env::Env;
use crate::files;
use crate::process;
use crate::remote::{self, Remote};
use crate::result::CompileResult;
use crate::stats::{self, Outcome};

pub use tiers::push_entries;
use tiers::Tiers;

/// Everything one invocation needs, gathered by `main`.
#[derive(Debug)]
pub struct Invocation<'a> {
    pub config: &'a Config,
    pub env: &'a Env,
    pub cwd: PathBuf,
    /// The real compiler.
    pub compiler: PathBuf,
    /// The arguments as given (after the compiler).
    pub args: Vec<OsString>,
    /// Whether kiln's stderr is a terminal (compilers colour diagnostics then).
    pub stderr_tty: bool,
}

/// Why the cache steps aside for this compile.
enum Skip {
    Uncacheable(Why),
    Error(anyhow::Error),
}

/// An uncacheable compile's reason, and the file and argument that decided it when known:
/// `KILN_LOG=debug` names them (issue 15).
struct Why {
    reason: Reason,
    file: Option<String>,
    arg: Option<String>,
}

impl Why {
    fn explain(&self) -> String {
        let mut out = format!("uncacheable ({})", self.reason.name());
        if let Some(file) = &self.file {
            out.push_str(&format!(": {file}"));
        }
        if let Some(arg) = &self.arg {
            out.push_str(&format!(", because of `{arg}`"));
        }
        out
    }
}

impl From<Reason> for Skip {
    fn from(reason: Reason) -> Skip {
        Skip::Uncacheable(Why {
            reason,
            file: None,
            arg: None,
        })
    }
}

/// An uncacheable compile decided by a file.
fn uncacheable_by(reason: Reason, file: &str) -> Skip {
    Skip::Uncacheable(Why {
        reason,
        file: Some(file.to_owned()),
        arg: None,
    })
}

impl From<anyhow::Error> for Skip {
    fn from(e: anyhow::Error) -> Skip {
        Skip::Error(e)
    }
}

/// What the flow needs from a compiler family. The flow itself (the tiers, the farm and its
/// fallback, what is counted) is the same for every family.
trait Family: Sized {
    /// The compile classified and keyed, or why the cache steps aside.
    fn prepare(inv: &Invocation) -> Result<Self, Skip>;
    /// The manifest key.
    fn key(&self) -> &Digest;
    /// The source, as given: what logs and warnings name.
    fn source(&self) -> &str;
    /// A result for this compile from the tiers, its recorded inputs checked against what is
    /// there now.
    fn lookup(&self, inv: &Invocation, tiers: &mut Tiers) -> anyhow::Result<Option<CompileResult>>;
    /// Writes a result's outputs where the compiler would have, and replays its output.
    fn deliver(&self, inv: &Invocation, r: &CompileResult) -> anyhow::Result<()>;
    /// The command a miss runs: the arguments as given and what kiln adds to learn the inputs.
    fn command(&self, inv: &Invocation) -> anyhow::Result<Command>;
    /// The job the farm runs for `cmd`, or why this compile stays here.
    fn farm_job(&self, inv: &Invocation, cmd: &Command) -> Result<farm::Job, dist::Fallback>;
    /// Stores the result of a compile that succeeded, with what its inputs were.
    fn store(
        &self,
        inv: &Invocation,
        tiers: &mut Tiers,
        cmd: &Command,
        started: Started,
        ran: Ran<'_>,
    ) -> Result<(), Skip>;
}

/// The command a miss runs.
struct Command {
    args: Vec<String>,
    /// A file kiln added to the command for itself (the C family's dependency list): a failure
    /// that names it is kiln's (its disk is full, say), not the compile's.
    scratch: Option<TempFile>,
}

/// How a compile ends.
enum End {
    /// The compiler ran, here or on the farm: its exit code is kiln's.
    Exit(i32),
    /// kiln stepped aside: the compiler runs in its place, as the user asked.
    Exec,
}

/// What one compile did, counted once when it ends (`kiln stats`).
#[derive(Default)]
struct Tally {
    /// Damaged cache entries met (and removed) on the way.
    corrupt: u32,
    remote: remote::Counts,
    /// Sent to the farm: done there (`true` when the toolchain was uploaded), or why not.
    dist: Option<Result<bool, &'static str>>,
    /// A farm result compiled again here: whether the two agreed.
    cross_check: Option<bool>,
}

impl Tally {
    fn record(&self, cache_dir: &Path, outcome: Outcome) {
        stats::record(cache_dir, outcome, self.corrupt);
        stats::record_remote(cache_dir, self.remote);
        if let Some(dist) = self.dist {
            stats::record_dist(cache_dir, dist);
        }
        if let Some(agreed) = self.cross_check {
            stats::record_cross_check(cache_dir, agreed);
        }
    }
}

/// Runs one compile through the cache and returns the exit code.
pub fn run(inv: &Invocation) -> i32 {
    if inv.config.disable {
        return exec_direct(inv);
    }
    run_family::<c_family::CCompile>(inv)
}

fn run_family<F: Family>(inv: &Invocation) -> i32 {
    let mut tally = Tally::default();
    let (end, outcome) = flow::<F>(inv, &mut tally);
    if inv.config.stats {
        tally.record(&inv.config.dir, outcome);
    }
    match end {
        End::Exit(code) => code,
        End::Exec => exec_direct(inv),
    }
}

fn flow<F: Family>(inv: &Invocation, tally: &mut Tally) -> (End, Outcome) {
    let started = Instant::now();
    let t0 = SystemTime::now();
    let cfg = inv.config;
    let store = Store::open(
        &cfg.dir,
        Limits {
            max_size: cfg.max_size,
            max_files: cfg.max_files,
        },
    );
    let job = match F::prepare(inv) {
        Ok(job) => job,
        Err(skip) => return (End::Exec, stepped_aside(inv, skip)),
    };
    tracing::debug!(key = %job.key(), source = %job.source(), "manifest key");
    let mut tiers = Tiers {
        store: &store,
        remote: Remote::from_config(cfg),
        counts: remote::Counts::default(),
        corrupt: 0,
    };
    let ended = 'ended: {
        if !cfg.recache {
            match job.lookup(inv, &mut tiers) {
                Ok(Some(result)) => match job.deliver(inv, &result) {
                    Ok(()) => {
                        let saved =
                            i64::from(result.compile_ms) - started.elapsed().as_millis() as i64;
                        tracing::debug!(saved_ms = saved, "cache hit");
                        break 'ended (End::Exit(0), Outcome::Hit { saved_ms: saved });
                    }
                    Err(e) => {
                        tracing::warn!("cannot write cached outputs: {e:#}; compiling instead");
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cache lookup failed; compiling")
                }
            }
        }
        miss(inv, &job, &mut tiers, tally, t0, started)
    };
    tally.corrupt = tiers.corrupt;
    tally.remote = tiers.counts;
    ended
}

/// The outcome of a compile the cache steps aside for, said in the log.
fn stepped_aside(inv: &Invocation, skip: Skip) -> Outcome {
    match skip {
        Skip::Uncacheable(mut why) => {
            if tracing::enabled!(tracing::Level::DEBUG) {
                if why.file.is_none() {
                    let args: Vec<String> = inv
                        .args
                        .iter()
                        .map(|a| a.to_string_lossy().into_owned())
                        .collect();
                    why.file = crate::args::source_in(&args).map(str::to_owned);
                }
                tracing::debug!("{}; running the compiler directly", why.explain());
            }
            Outcome::Uncacheable(why.reason)
        }
        Skip::Error(e) => {
            // Not on stderr: the compiler's own diagnostics must come out unchanged (a
            // missing source, say, is the compiler's to report). `kiln stats` counts it.
            tracing::warn!("{e:#}; compiling without the cache");
            Outcome::Error
        }
    }
}

/// A miss: compile, here or on the farm, and store what the compile made.
fn miss<F: Family>(
    inv: &Invocation,
    job: &F,
    tiers: &mut Tiers,
    tally: &mut Tally,
    t0: SystemTime,
    started: Instant,
) -> (End, Outcome) {
    let cfg = inv.config;
    let cmd = match job.command(inv) {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::warn!("{e:#}; compiling without the cache");
            return (End::Exec, Outcome::Error);
        }
    };
    // The file system's clock just before anything of the compile reads its inputs (the
    // farm's include scan included): an input whose ctime is earlier did not change during it.
    let mark = if cfg.read_only {
        None
    } else {
        files::Mark::take(&cfg.dir.join("tmp"))
            .inspect_err(|e| {
                tracing::debug!(error = %e, "cannot stamp the start of the compile; recent inputs are not stored")
            })
            .ok()
    };
    let (output, read) = match farm::compile(inv, job, &cmd, tally) {
        Ok(ran) => ran,
        Err(e) => {
            // Too long a command line for kiln's own spawn, say: the compiler as asked.
            tracing::warn!(
                "cannot run {}: {e}; compiling without the cache",
                inv.compiler.display()
            );
            return (End::Exec, Outcome::Error);
        }
    };
    let compile_ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
    let code = exit_code(&output.status);
    if code != 0 {
        if let Some(t) = &cmd.scratch {
            let ours = t.0.to_string_lossy();
            if memchr::memmem::find(&output.stderr, ours.as_bytes()).is_some() {
                stats::warn_unwritable_deps(&cfg.dir, &output.stderr, &ours);
                return (End::Exec, Outcome::Error);
            }
        }
    }
    replay(&output.stdout, &output.stderr);
    if code != 0 {
        return (End::Exit(code), Outcome::CompileFailed);
    }
    if cfg.read_only {
        return (End::Exit(0), Outcome::Miss);
    }
    let ran = Ran {
        output: &output,
        compile_ms,
        read: read.as_ref(),
    };
    let outcome = match job.store(inv, tiers, &cmd, Started { t0, mark }, ran) {
        Ok(()) => Outcome::Miss,
        Err(Skip::Uncacheable(mut why)) => {
            why.file.get_or_insert_with(|| job.source().to_owned());
            tracing::debug!("compiled, but not stored: {}", why.explain());
            Outcome::Uncacheable(why.reason)
        }
        Err(Skip::Error(e)) => {
            tracing::warn!("compiled, but cannot store the result: {e:#}");
            Outcome::Error
        }
    };
    (End::Exit(0), outcome)
}

fn exec_direct(inv: &Invocation) -> i32 {
    let err = process::exec(&inv.compiler, &inv.args);
    eprintln!("kiln: cannot run {}: {err}", inv.compiler.display());
    127
}

fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// When a compile started, by the wall clock and by the file system's (see [`files::Mark`]).
#[derive(Clone, Copy)]
struct Started {
    t0: SystemTime,
    mark: Option<files::Mark>,
}

impl Started {
    /// Refuses to store a result when the file `path`, with this stat after the compile, may
    /// have changed during it; the debug line names the file and what is known.
    fn still(&self, path: &str, stat: &files::Stat) -> Result<(), Skip> {
        match files::last_change(stat, self.t0, self.mark) {
            files::Since::Before => Ok(()),
            files::Since::After => {
                tracing::debug!(file = path, "changed during the compile");
                Err(uncacheable_by(Reason::ModifiedDuringCompile, path))
            }
            files::Since::Unknown => {
                tracing::debug!(
                    file = path,
                    "written so close to the compile's start that its timestamps cannot tell \
                     whether the compiler read it before or after the change"
                );
                Err(uncacheable_by(Reason::InputTooRecent, path))
            }
        }
    }
}

/// What the farm's include scan read before the compile, by path.
type Read = std::collections::HashMap<PathBuf, files::Hashed>;

/// A compile that ran, as [`Family::store`] keeps it.
struct Ran<'a> {
    output: &'a std::process::Output,
    compile_ms: u32,
    /// What the farm's include scan read before the compile, if it ran.
    read: Option<&'a Read>,
}

fn replay(stdout: &[u8], stderr: &[u8]) {
    // A closed stdout or stderr is the caller's business, as it would be for the compiler.
    let _ = std::io::stdout().write_all(stdout);
    let _ = std::io::stderr().write_all(stderr);
}

/// Writes a build output whole or not at all (see [`kiln_cache::replace_output`]).
fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    kiln_cache::replace_output(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A temporary file in the cache's `tmp/` directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &Path, suffix: &str) -> anyhow::Result<TempFile> {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Ok(TempFile(
            tmp.join(format!("{}.{nanos}{suffix}", std::process::id())),
        ))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
