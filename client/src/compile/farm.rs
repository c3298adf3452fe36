//! The farm's part of a miss: send the compile to a builder, or keep it here.
//!
//! The policy is the same for every family: a compile goes to the farm with `--dist` when the
//! family can package it ([`Family::farm_job`]), comes back to this machine for any cause the
//! farm gives (counted by cause; the build never fails because the farm failed), and a
//! sample of farm results (`cross_check`) is compiled again here and compared, so a builder
//! that answers wrongly is reported and taken out of the farm.

use std::fs;
use std::path::PathBuf;

use super::{Command, Family, Invocation, Read, Tally};
use crate::closure::Closure;
use crate::dist::{self, Fallback};
use crate::process;
use crate::toolchain::Toolchain;

/// A compile as the farm runs it, packaged by its family.
pub(super) struct Job {
    pub toolchain: Toolchain,
    /// The command line, compiler first.
    pub argv: Vec<String>,
    /// The input files and directories the builder needs besides the toolchain.
    pub inputs: Closure,
    /// The absolute paths of the files the compile writes, to take back from the builder.
    pub outputs: Vec<PathBuf>,
    /// The source, absolute.
    pub source: PathBuf,
}

/// Runs a miss's compile: on the farm with `--dist`, here otherwise or when the farm cannot
/// (the cause is counted). With it comes what the family read of the inputs to send them,
/// which storing the result need not read again.
pub(super) fn compile<F: Family>(
    inv: &Invocation,
    job: &F,
    cmd: &Command,
    tally: &mut Tally,
) -> std::io::Result<(std::process::Output, Option<Read>)> {
    let cfg = inv.config;
    let mut read = None;
    if cfg.dist {
        let (outcome, scanned) = distribute(inv, job, cmd);
        read = scanned;
        tally.dist = Some(
            outcome
                .as_ref()
                .map(|done| done.sent_toolchain)
                .map_err(Fallback::name),
        );
        match outcome {
            Ok(done) => {
                tracing::debug!(builder = %done.builder, "compiled on the farm");
                if done.output.status.success() && sampled(cfg.cross_check) {
                    let output = cross_check(inv, job.source(), &cmd.args, done, tally)?;
                    return Ok((output, read));
                }
                return Ok((done.output, read));
            }
            Err(fallback) => tracing::info!("{fallback}; compiling locally"),
        }
    }
    let output = process::capture(&inv.compiler, &cmd.args, Some(true))?;
    Ok((output, read))
}

/// Sends the compile to the farm. What the family read of the inputs comes back even when the
/// farm then fails, for the local compile's result to use.
fn distribute<F: Family>(
    inv: &Invocation,
    job: &F,
    cmd: &Command,
) -> (Result<dist::Done, Fallback>, Option<Read>) {
    let Some(scheduler) = dist::Farm::from_config(inv.config) else {
        return (Err(Fallback::NoScheduler), None);
    };
    let (done, read) = match job.farm_job(inv, cmd) {
        Ok(sent) => {
            let done = dist::compile(&dist::Request {
                scheduler: &scheduler,
                toolchain: &sent.toolchain.archive,
                toolchain_digest: sent.toolchain.digest,
                argv: sent.argv,
                cwd: &inv.cwd,
                env: inv.env,
                files: &sent.inputs.files,
                read: &sent.inputs.read,
                dirs: &sent.inputs.dirs,
                outputs: &sent.outputs,
                source: &sent.source,
                tty: inv.stderr_tty,
            });
            (done, Some(sent.inputs.read))
        }
        Err(fallback) => (Err(fallback), None),
    };
    // Every fallback past this point, whatever made it, is the scheduler's to count too.
    if let Err(fallback) = &done {
        crate::agent::tell_fallback(&scheduler, fallback.name());
    }
    (done, read)
}

/// True for about `rate` of the calls.
fn sampled(rate: f64) -> bool {
    use std::hash::{BuildHasher, Hasher};
    if rate <= 0.0 {
        return false;
    }
    // Seeded from the OS's random source once per process; enough to pick jobs fairly.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() as f64 / u64::MAX as f64) < rate
}

/// Compiles a farm job again here and compares the outputs. This machine's result is the one
/// kept either way; a builder whose outputs differ is reported to the scheduler, which places
/// no more jobs on it, and the user is told on stderr.
fn cross_check(
    inv: &Invocation,
    label: &str,
    args: &[String],
    done: dist::Done,
    tally: &mut Tally,
) -> std::io::Result<std::process::Output> {
    let remote: Vec<(PathBuf, Option<Vec<u8>>)> = done
        .outputs
        .iter()
        .map(|path| (path.clone(), fs::read(path).ok()))
        .collect();
    let local = process::capture(&inv.compiler, args, Some(true))?;
    let mut differing: Vec<String> = remote
        .iter()
        .filter(|(path, bytes)| fs::read(path).ok() != *bytes)
        .map(|(path, _)| path.display().to_string())
        .collect();
    if local.status.code() != done.output.status.code() {
        differing.push("the exit status".into());
    }
    let cfg = inv.config;
    tally.cross_check = Some(differing.is_empty());
    if differing.is_empty() {
        tracing::debug!(builder = %done.builder, "cross-check agreed");
        return Ok(local);
    }
    let reported = dist::Farm::from_config(cfg)
        .ok_or_else(|| anyhow::anyhow!("no scheduler"))
        .and_then(|farm| dist::report_suspect(&farm, &done.builder, label, differing.clone()));
    let mut stderr = local.stderr.clone();
    stderr.extend_from_slice(
        format!(
            "kiln: warning: builder {} compiled {label} differently from this machine ({}); \
             kept this machine's result and {}\n",
            done.builder,
            differing.join(", "),
            match reported {
                Ok(()) => "reported the builder as suspect".to_string(),
                Err(e) => format!("could not report it: {e:#}"),
            }
        )
        .as_bytes(),
    );
    Ok(std::process::Output { stderr, ..local })
}
