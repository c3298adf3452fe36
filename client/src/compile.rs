//! One wrapped compile: classify, look up, and on a miss compile and store.
//!
//! The flow, and what each step guarantees:
//! 1. The command is classified ([`crate::args`]). Anything uncacheable runs the real compiler
//!    in place of kiln (`exec`), unchanged.
//! 2. The *manifest key* hashes the compiler's identity, the arguments that matter, the source
//!    and the environment that changes the output. Its manifest lists, per earlier result, the
//!    headers used with their digests and the paths that must stay absent (shadowing).
//! 3. A hit writes the outputs atomically and replays stdout and stderr.
//! 4. A miss runs the compiler once, with `-MD -MF <tmp>` added when the user asked for no
//!    dependency file, so kiln learns every header without a second preprocessor pass. The
//!    headers are hashed after the compile; if any changed during it, nothing is stored. "During"
//!    is decided against a [`files::Mark`] stamped just before the compile, so a header
//!    generated an instant before it is still cached.
//!
//! A failure of kiln itself never fails the build: before the compile it falls back to running
//! the compiler directly, after it the compile's own result stands.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use kiln_cache::{Digest, Hasher, Kind, Limits, Lookup, Store};

use crate::args::{self, Compile, Reason};
use crate::closure::Probe;
use crate::compiler::{self, Family, Identity};
use crate::config::Config;
use crate::depfile;
use crate::dist;
use crate::env::{Env, COMPILER_VARS, SIDE_OUTPUT_VARS};
use crate::files::{self, Hashed, Scan, Since};
use crate::manifest::{DirRecord, FileRecord, Manifest};
use crate::process;
use crate::remote::{self, Remote};
use crate::result::{CompileResult, Part};
use crate::search_path::SearchPath;
use crate::stats::{self, Outcome};
use crate::{closure, toolchain};

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

/// A classified compile with its key, ready for lookup.
struct Prepared {
    compile: Compile,
    identity: Identity,
    search: SearchPath,
    source: Hashed,
    key: Digest,
}

/// Runs one compile through the cache and returns the exit code.
pub fn run(inv: &Invocation) -> i32 {
    let started = Instant::now();
    let t0 = SystemTime::now();
    let cfg = inv.config;
    if cfg.disable {
        return exec_direct(inv);
    }
    let store = Store::open(
        &cfg.dir,
        Limits {
            max_size: cfg.max_size,
            max_files: cfg.max_files,
        },
    );
    let prepared = match prepare(inv) {
        Ok(p) => p,
        Err(skip) => {
            let outcome = match skip {
                Skip::Uncacheable(mut why) => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        if why.file.is_none() {
                            let args: Vec<String> = inv
                                .args
                                .iter()
                                .map(|a| a.to_string_lossy().into_owned())
                                .collect();
                            why.file = args::source_in(&args).map(str::to_owned);
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
            };
            if cfg.stats {
                stats::record(&cfg.dir, outcome, 0);
            }
            return exec_direct(inv);
        }
    };
    tracing::debug!(key = %prepared.key, source = %prepared.compile.source, "manifest key");

    let mut tiers = Tiers {
        store: &store,
        remote: Remote::from_config(cfg),
        counts: remote::Counts::default(),
        corrupt: 0,
    };
    if !cfg.recache {
        match lookup(inv, &mut tiers, &prepared) {
            Ok(Some(result)) => match deliver(inv, &prepared.compile, &result) {
                Ok(()) => {
                    let saved = i64::from(result.compile_ms) - started.elapsed().as_millis() as i64;
                    tracing::debug!(saved_ms = saved, "cache hit");
                    if cfg.stats {
                        stats::record(&cfg.dir, Outcome::Hit { saved_ms: saved }, tiers.corrupt);
                        stats::record_remote(&cfg.dir, tiers.counts);
                    }
                    return 0;
                }
                Err(e) => {
                    tracing::warn!("cannot write cached outputs: {e:#}; compiling instead");
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cache lookup failed; compiling"),
        }
    }
    compile_and_store(inv, tiers, prepared, t0, started)
}

fn exec_direct(inv: &Invocation) -> i32 {
    let err = process::exec(&inv.compiler, &inv.args);
    eprintln!("kiln: cannot run {}: {err}", inv.compiler.display());
    127
}

fn prepare(inv: &Invocation) -> Result<Prepared, Skip> {
    let args: Vec<String> = inv
        .args
        .iter()
        .map(|a| a.to_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or(Reason::NonUtf8)?;
    let args = args::expand_response_files(&args, &inv.cwd)?;
    let compile = args::classify_explained(args).map_err(|r| {
        Skip::Uncacheable(Why {
            reason: r.reason,
            file: None,
            arg: r.arg,
        })
    })?;
    if let Some(var) = SIDE_OUTPUT_VARS.iter().find(|v| inv.env.os(v).is_some()) {
        return Err(Skip::Uncacheable(Why {
            reason: Reason::Environment,
            file: Some(compile.source.clone()),
            arg: Some(format!("{var} in the environment")),
        }));
    }
    // kiln replaces outputs by renaming a new file into place, which must never happen to
    // `/dev/null`, a pipe or what a symbolic link points to: the compiler writes through those.
    let mut outputs = vec![compile.output.clone()];
    outputs.extend(compile.dep_file.as_ref().map(|d| d.path.clone()));
    if compile.split_dwarf {
        outputs.push(args::dwo_path(&compile.output));
    }
    for o in &outputs {
        if fs::symlink_metadata(inv.cwd.join(o)).is_ok_and(|m| !m.is_file()) {
            return Err(uncacheable_by(Reason::SpecialOutput, &o.to_string_lossy()));
        }
    }
    let source_path = inv.cwd.join(&compile.source);
    let source = match files::hash_file(&source_path) {
        Ok(s) => s,
        // The compiler will say so in its own words.
        Err(files::HashError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(uncacheable_by(Reason::NoSource, &compile.source))
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("cannot read source {}", source_path.display()))
                .into())
        }
    };
    let identity = compiler::identify(&inv.compiler, &inv.config.dir)?;
    let search = SearchPath::of(&compile, &identity, inv.env);
    if precompiled_header_in_use(inv, &compile, &search, &source.data, identity.family) {
        return Err(uncacheable_by(Reason::PrecompiledHeader, &compile.source));
    }
    // The source is scanned for __TIME__ and friends only when a result is stored: a manifest
    // found under a key that includes the source's digest already knows what it contains.
    let key = manifest_key(inv, &compile, &identity, &source)?;
    Ok(Prepared {
        compile,
        identity,
        search,
        source,
        key,
    })
}

/// Whether the compile would use a precompiled header, which no dependency list names: for an
/// `-include X`, `X.gch` or `X.pch` where `X` is looked for; for gcc also a `.gch` of the
/// source's first `#include`.
fn precompiled_header_in_use(
    inv: &Invocation,
    c: &Compile,
    search: &SearchPath,
    source: &[u8],
    family: Family,
) -> bool {
    let exists = |p: PathBuf| fs::metadata(inv.cwd.join(p)).is_ok();
    let found_near = |name: &str, first: &str, suffixes: &[&str]| {
        suffixes.iter().any(|sfx| {
            let file = format!("{name}{sfx}");
            if Path::new(name).is_absolute() {
                return exists(PathBuf::from(&file));
            }
            exists(Path::new(first).join(&file))
                || search
                    .all()
                    .any(|d| exists(Path::new(d.as_str()).join(&file)))
        })
    };
    if c.preprocessor
        .includes
        .iter()
        .any(|name| found_near(name, ".", &[".gch", ".pch"]))
    {
        return true;
    }
    if family == Family::Gcc {
        if let Some(first) = first_include(source) {
            let source_dir = parent_of(&c.source);
            if found_near(&first, &source_dir, &[".gch"]) {
                return true;
            }
        }
    }
    false
}

/// The name in the first `#include` directive of a source, if any.
fn first_include(source: &[u8]) -> Option<String> {
    for line in source.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let Some(rest) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("include") else {
            continue;
        };
        let rest = rest.trim_start();
        let close = match rest.chars().next()? {
            '"' => '"',
            '<' => '>',
            _ => return None,
        };
        return rest[1..].split(close).next().map(str::to_owned);
    }
    None
}

/// The 15-minute UTC slot a `__DATE__` result belongs to. Every time zone's offset is a
/// multiple of 15 minutes, so the local date never changes within a slot.
fn date_slot() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("utc-slot-{}", secs / 900)
}

fn manifest_key(
    inv: &Invocation,
    c: &Compile,
    id: &Identity,
    source: &Hashed,
) -> anyhow::Result<Digest> {
    let cfg = inv.config;
    let covered = |path: &str| {
        let by =
            |maps: &[(String, String)]| maps.iter().any(|(old, _)| path.starts_with(old.as_str()));
        by(&c.macro_maps) && (!c.debug || by(&c.prefix_maps))
    };
    let rel = |s: &str| relativize(s, cfg.base_dir.as_deref(), &inv.cwd, covered);
    let mut h = Hasher::new("kiln manifest key v1");
    h.digest(&id.digest())
        .str(c.lang.name())
        .str(&rel(&c.source))
        .digest(&source.digest);
    h.field(&[u8::from(c.assembly)]);
    for a in &c.hashed_args {
        h.str(&rel(a));
    }
    h.str(match &c.dep_file {
        None => "deps:none",
        Some(d) if d.user_headers_only => "deps:mmd",
        Some(_) => "deps:md",
    });
    let output_matters = (c.dep_file.is_some() && !c.dep_target_given)
        || c.split_dwarf
        || c.embeds_output_path
        || c.records_cwd;
    if output_matters {
        h.str("output").str(&rel(&c.output.to_string_lossy()));
    }
    let cwd = inv.cwd.to_string_lossy();
    let mapped_cwd = c
        .prefix_maps
        .iter()
        .rev()
        .find(|(old, _)| cwd.starts_with(old.as_str()))
        .map(|(old, new)| format!("{new}{}", &cwd[old.len()..]));
    // The object records the working directory when it has debug info (DW_AT_comp_dir) and an
    // absolute path when it writes profile data; a dependency file is not relocatable.
    let cwd_in_output = (c.debug && cfg.hash_dir && !c.comp_dir_given)
        || c.embeds_output_path
        || c.profile_use_default
        || c.records_cwd
        || c.split_dwarf
        || (cfg.base_dir.is_some() && c.dep_file.is_some());
    if cwd_in_output {
        let recorded = match &mapped_cwd {
            Some(m) if !c.embeds_output_path => m.clone(),
            _ => cwd.into_owned(),
        };
        h.str("cwd").str(&recorded);
    }
    for var in COMPILER_VARS {
        if let Some(v) = inv.env.os(var) {
            h.str(var).field(v.as_encoded_bytes());
        }
    }
    for flag in terminal_flags(inv, c, id.family) {
        h.str(&flag);
    }
    for p in &c.profile_inputs {
        hash_path_contents(&mut h, &inv.cwd.join(p));
    }
    if c.profile_use_default {
        // gcc reads the .gcda beside the output, clang `default.profdata` here.
        hash_path_contents(&mut h, &inv.cwd.join(c.output.with_extension("gcda")));
        hash_path_contents(&mut h, &inv.cwd.join("default.profdata"));
    }
    if c.native_cpu {
        h.str("cpu").str(&cpu_identity());
    }
    Ok(h.finish())
}

/// Flags that make the compiler write to a pipe what it would write to this terminal:
/// colours when stderr is a terminal whose `TERM` is not `dumb`, as gcc and clang decide
/// themselves, and gcc's links in diagnostics (except on the Linux console, where gcc leaves
/// them out). Nothing when the user chose, or stderr is not a terminal.
fn terminal_flags(inv: &Invocation, c: &Compile, family: Family) -> Vec<String> {
    let term = inv.env.get("TERM");
    if !inv.stderr_tty || c.color_given || matches!(term, None | Some("dumb")) {
        return Vec::new();
    }
    match family {
        Family::Clang => vec!["-fcolor-diagnostics".to_owned()],
        Family::Gcc => {
            let mut flags = vec!["-fdiagnostics-color=always".to_owned()];
            let urls_given = c.args.iter().any(|a| a.starts_with("-fdiagnostics-urls"));
            if !urls_given && term != Some("linux") {
                flags.push("-fdiagnostics-urls=always".to_owned());
            }
            flags
        }
    }
}

/// Hashes a profile file, or every file in a profile directory, or notes its absence.
fn hash_path_contents(h: &mut Hasher, path: &Path) {
    h.str(&path.to_string_lossy());
    if let Ok(rd) = fs::read_dir(path) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            if let Ok(data) = fs::read(&p) {
                h.str(&p.to_string_lossy()).digest(&Digest::of(&data));
            }
        }
    } else if let Ok(data) = fs::read(path) {
        h.digest(&Digest::of(&data));
    } else {
        h.str("absent");
    }
}

/// The host CPU as `-march=native` sees it.
fn cpu_identity() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pick = |field: &str| {
        info.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{}|{}|{}",
        pick("vendor_id"),
        pick("model name"),
        pick("flags")
    )
}

/// With a base directory, absolute paths under it are hashed relative to the working directory,
/// so the same tree checked out elsewhere has the same keys. `-I/abs` and `-ffile-prefix-map=/abs=x`
/// style arguments are rewritten too, but only paths that `covered` says the output cannot
/// show (a prefix map rewrites them in `__FILE__` and debug info): the compiler still sees
/// the absolute path, and a hit must be what it would produce.
fn relativize(
    arg: &str,
    base: Option<&Path>,
    cwd: &Path,
    covered: impl Fn(&str) -> bool,
) -> String {
    let Some(base) = base else {
        return arg.to_owned();
    };
    let base = base.to_string_lossy();
    let Some(at) = arg.find(base.as_ref()) else {
        return arg.to_owned();
    };
    let (prefix, path) = arg.split_at(at);
    if !(prefix.is_empty() || prefix.starts_with('-')) {
        return arg.to_owned();
    }
    let (path, rest) = match path.split_once('=') {
        Some((p, r)) => (p, format!("={r}")),
        None => (path, String::new()),
    };
    let is_map = prefix.starts_with("-f") && prefix.ends_with("prefix-map=");
    if !is_map && !covered(path) {
        return arg.to_owned();
    }
    format!(
        "{prefix}{}{rest}",
        relative_path(Path::new(path), cwd).display()
    )
}

/// `path` relative to `from`, lexically (both absolute).
fn relative_path(path: &Path, from: &Path) -> PathBuf {
    let p: Vec<Component> = path.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = p.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The local store and, behind it, the remote tier with what this process did with it.
struct Tiers<'a> {
    store: &'a Store,
    remote: Option<Remote>,
    counts: remote::Counts,
    corrupt: u32,
}

impl Tiers<'_> {
    /// An entry from the local store, else from the remote tier (then copied into the local
    /// store). The flag says it came from the remote tier.
    fn fetch(
        &mut self,
        kind: Kind,
        remote_kind: remote::Entry,
        key: &Digest,
    ) -> anyhow::Result<Option<(Vec<u8>, bool)>> {
        match self.store.get(kind, key)? {
            Lookup::Hit(bytes) => return Ok(Some((bytes, false))),
            Lookup::Corrupt(e) => {
                tracing::debug!("the local {kind:?} entry was damaged ({e}) and has been removed");
                self.corrupt += 1;
            }
            Lookup::Miss => {}
        }
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        match remote.get(remote_kind, key) {
            Ok(Some(bytes)) => {
                if let Err(e) = self.store.put(kind, key, &bytes) {
                    tracing::debug!(error = %e, "cannot copy a remote entry into the local cache");
                }
                Ok(Some((bytes, true)))
            }
            Ok(None) => Ok(None),
            Err(_) => {
                self.counts.errors += 1;
                Ok(None)
            }
        }
    }

    /// The server's manifest for a key, if there is a server and it has one.
    fn remote_manifest(&mut self, key: &Digest) -> Option<Manifest> {
        match self.remote.as_ref()?.get(remote::Entry::Manifest, key) {
            Ok(found) => Manifest::decode(&found?),
            Err(_) => {
                self.counts.errors += 1;
                None
            }
        }
    }

    /// A result, decoded; one that does not decode is removed and is a miss.
    fn fetch_result(&mut self, key: &Digest) -> anyhow::Result<Option<CompileResult>> {
        let Some((bytes, remote)) = self.fetch(Kind::Result, remote::Entry::Result, key)? else {
            return Ok(None);
        };
        match CompileResult::decode(&bytes) {
            Some(r) => {
                self.counts.hits += i64::from(remote);
                Ok(Some(r))
            }
            None => {
                let _ = self.store.remove(Kind::Result, key);
                Ok(None)
            }
        }
    }
}

fn lookup(
    inv: &Invocation,
    tiers: &mut Tiers,
    p: &Prepared,
) -> anyhow::Result<Option<CompileResult>> {
    let (mut manifest, from_remote) =
        match tiers.fetch(Kind::Manifest, remote::Entry::Manifest, &p.key)? {
            Some((bytes, from_remote)) => match Manifest::decode(&bytes) {
                Some(m) => (m, from_remote),
                None => return Ok(None),
            },
            None => {
                tracing::debug!(
                    "miss: first compile of this source with these arguments and compiler"
                );
                return Ok(None);
            }
        };
    if manifest.preprocessor {
        let key = preprocessed_key(inv, p)?;
        tracing::debug!(
            %key,
            "preprocessor mode: {}",
            if manifest.preprocessor_why.is_empty() {
                "a project file uses __has_include with an argument kiln cannot follow"
            } else {
                &manifest.preprocessor_why
            }
        );
        let result = tiers.fetch_result(&key)?;
        if result.is_none() {
            tracing::debug!("miss: no result for this preprocessed text");
        }
        return Ok(result);
    }
    let found = match manifest.lookup(&inv.cwd, &date_slot()) {
        Some(found) => found,
        None => {
            // The local manifest may predate results other machines recorded on the server.
            let theirs = if from_remote {
                None
            } else {
                tiers.remote_manifest(&p.key)
            };
            let found = theirs.and_then(|theirs| {
                manifest.merge(&theirs);
                manifest.lookup(&inv.cwd, &date_slot())
            });
            match found {
                Some(found) => {
                    let _ = tiers.store.put(Kind::Manifest, &p.key, &manifest.encode());
                    found
                }
                None => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        tracing::debug!("miss: {}", manifest.explain_miss(&inv.cwd, &date_slot()));
                    }
                    return Ok(None);
                }
            }
        }
    };
    let result = tiers.fetch_result(&found.result)?;
    if result.is_none() {
        tracing::debug!("miss: the headers match, but the result is in neither cache");
    }
    if result.is_some() && !found.refreshed.is_empty() && !inv.config.read_only {
        // Headers that had to be re-read are now known stable: remember their stat.
        let mut m = manifest;
        m.refresh(&found.refreshed);
        let _ = tiers.store.put(Kind::Manifest, &p.key, &m.encode());
    }
    Ok(result)
}

/// Writes a result's files and replays its output.
fn deliver(inv: &Invocation, c: &Compile, r: &CompileResult) -> anyhow::Result<()> {
    let object = r.get(Part::Object).context("result has no object")?;
    write_output(&inv.cwd.join(&c.output), object)?;
    if let Some(d) = &c.dep_file {
        let bytes = r
            .get(Part::DepFile)
            .context("result has no dependency file")?;
        write_output(&inv.cwd.join(&d.path), bytes)?;
    }
    if let Some(dwo) = r.get(Part::Dwo) {
        write_output(&inv.cwd.join(args::dwo_path(&c.output)), dwo)?;
    }
    replay(
        r.get(Part::Stdout).unwrap_or(&[]),
        r.get(Part::Stderr).unwrap_or(&[]),
    );
    Ok(())
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

fn compile_and_store(
    inv: &Invocation,
    mut tiers: Tiers,
    p: Prepared,
    t0: SystemTime,
    started: Instant,
) -> i32 {
    let cfg = inv.config;
    let corrupt = tiers.corrupt;
    let c = &p.compile;
    // The arguments as given (an `@file` stays a file: expanded, it may be too long for a
    // command line), then kiln's own. `prepare` checked they are UTF-8.
    let mut args: Vec<String> = inv
        .args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let own_deps = match (&c.dep_file, c.lang.preprocessed()) {
        (None, true) => match TempFile::new(&cfg.dir, ".d") {
            Ok(t) => {
                args.extend([
                    "-MD".to_owned(),
                    "-MF".to_owned(),
                    t.0.to_string_lossy().into_owned(),
                ]);
                Some(t)
            }
            Err(e) => {
                tracing::warn!("{e:#}; compiling without the cache");
                if inv.config.stats {
                    stats::record(&inv.config.dir, Outcome::Error, corrupt);
                }
                return exec_direct(inv);
            }
        },
        _ => None,
    };
    if let Some(d) = &c.dep_file {
        if d.add_mf {
            args.extend(["-MF".to_owned(), d.path.to_string_lossy().into_owned()]);
        }
    }
    args.extend(terminal_flags(inv, c, p.identity.family));
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
    // What the farm's include scan read, reused when storing the result.
    let mut scanned = None;
    let output = match run_compiler(
        inv,
        &p,
        &args,
        own_deps.as_ref().map(|t| t.0.as_path()),
        &mut scanned,
    ) {
        Ok(o) => o,
        Err(e) => {
            // Too long a command line for kiln's own spawn, say: the compiler as asked.
            tracing::warn!(
                "cannot run {}: {e}; compiling without the cache",
                inv.compiler.display()
            );
            if cfg.stats {
                stats::record(&cfg.dir, Outcome::Error, corrupt);
            }
            return exec_direct(inv);
        }
    };
    let compile_ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
    let code = exit_code(&output.status);
    if code != 0 {
        // A failure that names kiln's own dependency file is kiln's (its disk is full, say),
        // not the compile's: run the compiler as the user asked, without the cache.
        if let Some(t) = &own_deps {
            let ours = t.0.to_string_lossy();
            if memchr::memmem::find(&output.stderr, ours.as_bytes()).is_some() {
                stats::warn_unwritable_deps(&cfg.dir, &output.stderr, &ours);
                if cfg.stats {
                    stats::record(&cfg.dir, Outcome::Error, corrupt);
                }
                return exec_direct(inv);
            }
        }
    }
    replay(&output.stdout, &output.stderr);
    if code != 0 {
        if cfg.stats {
            stats::record(&cfg.dir, Outcome::CompileFailed, corrupt);
        }
        return code;
    }
    if cfg.read_only {
        if cfg.stats {
            stats::record(&cfg.dir, Outcome::Miss, corrupt);
        }
        return 0;
    }
    let outcome = match store_result(
        inv,
        &mut tiers,
        &p,
        own_deps.as_ref(),
        Started { t0, mark },
        Ran {
            output: &output,
            compile_ms,
            read: scanned.as_ref().map(|c| &c.read),
        },
    ) {
        Ok(()) => Outcome::Miss,
        Err(Skip::Uncacheable(mut why)) => {
            why.file.get_or_insert_with(|| c.source.clone());
            tracing::debug!("compiled, but not stored: {}", why.explain());
            Outcome::Uncacheable(why.reason)
        }
        Err(Skip::Error(e)) => {
            tracing::warn!("compiled, but cannot store the result: {e:#}");
            Outcome::Error
        }
    };
    if cfg.stats {
        stats::record(&cfg.dir, outcome, corrupt);
        stats::record_remote(&cfg.dir, tiers.counts);
    }
    0
}

/// Runs the miss's compile: on the farm with `--dist`, locally otherwise or when the farm
/// cannot (the cause is counted; the build never fails for it).
fn run_compiler(
    inv: &Invocation,
    p: &Prepared,
    args: &[String],
    own_deps: Option<&Path>,
    scanned: &mut Option<closure::Closure>,
) -> std::io::Result<std::process::Output> {
    let cfg = inv.config;
    if cfg.dist {
        let outcome = distribute(inv, p, args, own_deps, scanned);
        if cfg.stats {
            stats::record_dist(
                &cfg.dir,
                outcome
                    .as_ref()
                    .map(|done| done.sent_toolchain)
                    .map_err(dist::Fallback::name),
            );
        }
        match outcome {
            Ok(done) => {
                tracing::debug!(builder = %done.builder, "compiled on the farm");
                if done.output.status.success() && sampled(cfg.cross_check) {
                    return cross_check(inv, p, args, done);
                }
                return Ok(done.output);
            }
            Err(fallback) => tracing::info!("{fallback}; compiling locally"),
        }
    }
    process::capture(&inv.compiler, args, Some(true))
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
    p: &Prepared,
    args: &[String],
    done: dist::Done,
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
    if cfg.stats {
        stats::record_cross_check(&cfg.dir, differing.is_empty());
    }
    if differing.is_empty() {
        tracing::debug!(builder = %done.builder, "cross-check agreed");
        return Ok(local);
    }
    let label = p.compile.source.clone();
    let reported = dist::Farm::from_config(cfg)
        .ok_or_else(|| anyhow::anyhow!("no scheduler"))
        .and_then(|farm| dist::report_suspect(&farm, &done.builder, &label, differing.clone()));
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

fn distribute(
    inv: &Invocation,
    p: &Prepared,
    args: &[String],
    own_deps: Option<&Path>,
    scanned: &mut Option<closure::Closure>,
) -> Result<dist::Done, dist::Fallback> {
    use dist::Fallback;
    let cfg = inv.config;
    let c = &p.compile;
    let scheduler = &dist::Farm::from_config(cfg).ok_or(Fallback::NoScheduler)?;
    // The builder's CPU is not this one, and profile data is not shipped.
    if c.native_cpu {
        return Err(Fallback::Unsupported(
            "-march=native depends on this machine's CPU".into(),
        ));
    }
    if !c.profile_inputs.is_empty() || c.profile_use_default {
        return Err(Fallback::Unsupported("profile data is not shipped".into()));
    }
    let t0 = std::time::Instant::now();
    let toolchain = match cfg.dist_toolchains.get(&inv.compiler) {
        Some(archive) => toolchain::supplied(&cfg.dir, archive),
        None => toolchain::ensure(
            &cfg.dir,
            &inv.compiler,
            &p.identity.digest(),
            inv.stderr_tty,
        ),
    }
    .map_err(|e| Fallback::Toolchain(format!("{e:#}")))?;
    let closure = match closure::scan(c, &p.search, &inv.cwd) {
        Ok(found) => found,
        // The preprocessor lists what a computed include or a moved search path reads.
        Err(why @ (closure::Unresolvable::Computed { .. } | closure::Unresolvable::Option(_))) => {
            tracing::debug!("{why}; asking the preprocessor for the headers");
            closure::from_preprocessor(&inv.compiler, c, &p.search, &inv.cwd)
                .map_err(|e| Fallback::Inputs(format!("{e:#}")))?
        }
        // Probes it does not list, and paths it cannot place: this compile stays here.
        Err(why) => return Err(Fallback::Inputs(why.to_string())),
    };
    tracing::debug!(
        toolchain_ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
        files = closure.files.len(),
        "toolchain and closure ready"
    );
    let cwd = &inv.cwd;
    let mut outputs = vec![cwd.join(&c.output)];
    if let Some(d) = &c.dep_file {
        outputs.push(cwd.join(&d.path));
    }
    if let Some(own) = own_deps {
        outputs.push(cwd.join(own));
    }
    if c.split_dwarf {
        outputs.push(cwd.join(args::dwo_path(&c.output)));
    }
    let mut argv = vec![inv.compiler.to_string_lossy().into_owned()];
    argv.extend(args.iter().cloned());
    let closure = scanned.insert(closure);
    dist::compile(&dist::Request {
        scheduler,
        toolchain: &toolchain.archive,
        toolchain_digest: toolchain.digest,
        argv,
        cwd,
        env: inv.env,
        files: &closure.files,
        read: &closure.read,
        dirs: &closure.dirs,
        outputs: &outputs,
        source: &cwd.join(&c.source),
        tty: inv.stderr_tty,
    })
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
            Since::Before => Ok(()),
            Since::After => {
                tracing::debug!(file = path, "changed during the compile");
                Err(uncacheable_by(Reason::ModifiedDuringCompile, path))
            }
            Since::Unknown => {
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

/// A compile that ran, as [`store_result`] keeps it.
struct Ran<'a> {
    output: &'a std::process::Output,
    compile_ms: u32,
    /// What the farm's include scan read before the compile, if it ran.
    read: Option<&'a std::collections::HashMap<PathBuf, files::Hashed>>,
}

fn store_result(
    inv: &Invocation,
    tiers: &mut Tiers,
    p: &Prepared,
    own_deps: Option<&TempFile>,
    started: Started,
    ran: Ran<'_>,
) -> Result<(), Skip> {
    let t0 = started.t0;
    let Ran {
        output,
        compile_ms,
        read,
    } = ran;
    let c = &p.compile;
    let cwd = &inv.cwd;
    // The source must be what was hashed before the compile.
    let source_path = cwd.join(&c.source);
    let source_now = files::stat(&source_path).context("source vanished during the compile")?;
    if source_now != p.source.stat {
        tracing::debug!(file = %c.source, "changed since kiln read it before the compile");
        return Err(uncacheable_by(Reason::ModifiedDuringCompile, &c.source));
    }
    if source_now.changed_since(t0) {
        // Written just before the compile (a generated source): the mark says whether it
        // changed after it, but kiln hashed the source before the mark, and a rewrite in the
        // same clock tick keeps the stat. Its content now is what the compiler read: it must
        // be what the key holds.
        started.still(&c.source, &source_now)?;
        match files::hash_file(&source_path) {
            Ok(again) if again.digest == p.source.digest && again.stat == source_now => {}
            _ => {
                tracing::debug!(file = %c.source, "changed since kiln read it before the compile");
                return Err(uncacheable_by(Reason::ModifiedDuringCompile, &c.source));
            }
        }
    }

    let headers = if c.lang.preprocessed() {
        header_list(inv, p, own_deps)?
    } else {
        Vec::new()
    };
    let mut records = Vec::with_capacity(headers.len());
    let source_scan = Scan::of(&p.source.data);
    let mut scan = source_scan;
    // `__has_include` in a project file (system headers use it everywhere and change only with
    // the system): the names it tests are followed like headers; one that cannot be read
    // literally makes direct mode untrustworthy for this compile.
    let system = normalized(&p.search.system);
    let mut probes: Vec<(String, Probe)> = Vec::new();
    // The first file whose `__has_include` cannot be followed, and that call.
    let mut untrusted: Option<String> = None;
    let mut note_probes = |path: &str, data: &[u8], scan: Scan| {
        if scan.has_include && !under_any(path, &system) {
            match closure::include_probes(data) {
                Ok(found) => probes.extend(found.into_iter().map(|pr| (parent_of(path), pr))),
                Err(what) if untrusted.is_none() => {
                    untrusted = Some(format!("{path} uses {what}, which kiln cannot follow"));
                }
                Err(_) => {}
            }
        }
    };
    note_probes(&c.source, &p.source.data, source_scan);
    // The first file using each macro kiln cannot cache, to name it.
    let first = |found: bool| found.then_some(c.source.as_str());
    let mut timestamp_in = first(source_scan.timestamp);
    let mut time_in = first(source_scan.time);
    let mut incbin_in = first(source_scan.incbin);
    let mut result_key = Hasher::new("kiln result key v1");
    result_key.digest(&p.key);
    for h in &headers {
        let path = cwd.join(h);
        // Read before the compile by the farm's include scan, and the same file still: what
        // was read then is what the compile read (the rule manifests use for headers).
        let earlier = read
            .and_then(|r| r.get(&path))
            .filter(|r| r.stable && files::stat(&path).is_ok_and(|now| now == r.stat));
        let fresh;
        let hashed = match earlier {
            Some(r) => r,
            None => match files::hash_file(&path) {
                Ok(x) => {
                    fresh = x;
                    &fresh
                }
                Err(e) => {
                    tracing::debug!(file = %h, error = %e, "cannot be read as the compiler read it");
                    return Err(uncacheable_by(Reason::ModifiedDuringCompile, h));
                }
            },
        };
        // A header generated just before the compile is cached when the mark proves it was
        // complete before the compile began; its record is not stable, so later lookups
        // re-hash it rather than trust its stat.
        started.still(h, &hashed.stat)?;
        let header_scan = Scan::of(&hashed.data);
        scan = scan.union(header_scan);
        if header_scan.timestamp {
            timestamp_in.get_or_insert(h);
        }
        if header_scan.time {
            time_in.get_or_insert(h);
        }
        if header_scan.incbin {
            incbin_in.get_or_insert(h);
        }
        note_probes(h, &hashed.data, header_scan);
        result_key.str(h).digest(&hashed.digest);
        records.push(FileRecord {
            path: h.clone(),
            digest: hashed.digest,
            stat: hashed.stat,
            stable: hashed.stable,
        });
    }
    // `__TIMESTAMP__` is the source's modification time whatever SOURCE_DATE_EPOCH says, and
    // only gcc lets SOURCE_DATE_EPOCH fix `__TIME__`.
    let fixed_time = inv.env.get("SOURCE_DATE_EPOCH").is_some() && p.identity.family == Family::Gcc;
    if scan.timestamp || (scan.time && !fixed_time) {
        let file = timestamp_in.or(time_in).unwrap_or(&c.source);
        return Err(uncacheable_by(Reason::TimeMacros, file));
    }
    if scan.incbin {
        return Err(uncacheable_by(
            Reason::Incbin,
            incbin_in.unwrap_or(&c.source),
        ));
    }
    let date = scan.date.then(date_slot);

    if let Some(why) = &untrusted {
        tracing::debug!("preprocessor mode: {why}");
    }
    let result_key = if untrusted.is_some() {
        // A `__has_include` kiln cannot follow: the output depends on files that may not
        // exist and that nothing names. Key this result by the preprocessor's output, as
        // ccache's preprocessor mode does.
        preprocessed_key(inv, p)?
    } else {
        if let Some(d) = &date {
            result_key.str(d);
        }
        result_key.finish()
    };

    let mut parts = vec![(Part::Object, read_output(cwd, &c.output)?)];
    if !output.stdout.is_empty() {
        parts.push((Part::Stdout, output.stdout.clone()));
    }
    if !output.stderr.is_empty() {
        parts.push((Part::Stderr, output.stderr.clone()));
    }
    if let Some(d) = &c.dep_file {
        parts.push((Part::DepFile, read_output(cwd, &d.path)?));
    }
    if c.split_dwarf {
        let dwo = cwd.join(args::dwo_path(&c.output));
        // Only a .dwo this compile wrote; an old one lying there is not part of the result.
        if files::stat(&dwo).is_ok_and(|s| s.changed_since(t0)) {
            parts.push((Part::Dwo, read_output(cwd, &args::dwo_path(&c.output))?));
        }
    }
    let result = CompileResult { compile_ms, parts }.encode();
    let store = tiers.store;
    store
        .put(Kind::Result, &result_key, &result)
        .context("cannot store the result")?;

    let manifest = if let Some(why) = untrusted {
        Manifest {
            preprocessor: true,
            preprocessor_why: why,
            ..Manifest::default()
        }
    } else {
        let (negatives, positives) = negative_paths(inv, p, &headers, &probes);
        let mut manifest = match store.get(Kind::Manifest, &p.key) {
            Ok(Lookup::Hit(bytes)) => Manifest::decode(&bytes).unwrap_or_default(),
            _ => Manifest::default(),
        };
        manifest.add(records, negatives, positives, date, result_key);
        manifest
    };
    let manifest = manifest.encode();
    store
        .put(Kind::Manifest, &p.key, &manifest)
        .context("cannot store the manifest")?;
    tracing::debug!(result = %result_key, headers = headers.len(), "stored");
    if let Some(remote) = &tiers.remote {
        if inv.config.remote_async {
            // Uploaded by a process of its own, which outlives this compile.
            let (m, r) = (p.key.to_hex(), result_key.to_hex());
            let args = [
                "remote-push",
                "--manifest",
                m.as_str(),
                "--result",
                r.as_str(),
            ]
            .map(std::ffi::OsStr::new);
            match std::env::current_exe().and_then(|exe| process::spawn_detached(&exe, &args)) {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot start the uploader; uploading now");
                    push_entries(store, remote, &mut tiers.counts, &p.key, &result_key);
                }
            }
        } else {
            push_entries(store, remote, &mut tiers.counts, &p.key, &result_key);
        }
    }
    Ok(())
}

/// Pushes a result and its manifest from the local store to the remote tier. The manifest
/// pushed, and kept locally, also holds what other machines recorded for the same key there.
pub fn push_entries(
    store: &Store,
    remote: &Remote,
    counts: &mut remote::Counts,
    manifest_key: &Digest,
    result_key: &Digest,
) {
    fn push(
        remote: &Remote,
        counts: &mut remote::Counts,
        kind: remote::Entry,
        key: &Digest,
        bytes: &[u8],
    ) {
        match remote.put(kind, key, bytes) {
            Ok(true) => counts.uploads += 1,
            Ok(false) => {}
            Err(_) => counts.errors += 1,
        }
    }
    if let Ok(Lookup::Hit(result)) = store.get(Kind::Result, result_key) {
        push(remote, counts, remote::Entry::Result, result_key, &result);
    }
    let Ok(Lookup::Hit(bytes)) = store.get(Kind::Manifest, manifest_key) else {
        return;
    };
    let Some(mut manifest) = Manifest::decode(&bytes) else {
        return;
    };
    match remote.get(remote::Entry::Manifest, manifest_key) {
        Ok(Some(theirs)) => {
            if let Some(theirs) = Manifest::decode(&theirs) {
                manifest.merge(&theirs);
            }
        }
        Ok(None) => {}
        Err(_) => counts.errors += 1,
    }
    let merged = manifest.encode();
    if merged != bytes {
        let _ = store.put(Kind::Manifest, manifest_key, &merged);
    }
    push(
        remote,
        counts,
        remote::Entry::Manifest,
        manifest_key,
        &merged,
    );
}

fn read_output(cwd: &Path, path: &Path) -> Result<Vec<u8>, Skip> {
    let full = cwd.join(path);
    fs::read(&full)
        .with_context(|| format!("cannot read compiler output {}", full.display()))
        .map_err(Skip::Error)
}

/// The key of a result in preprocessor mode: the manifest key and the digest of `-E` output.
fn preprocessed_key(inv: &Invocation, p: &Prepared) -> anyhow::Result<Digest> {
    let mut args = args::without_outputs(&p.compile.args);
    args.push("-E".to_owned());
    let out =
        process::capture(&inv.compiler, &args, None).context("cannot run the preprocessor")?;
    if !out.status.success() {
        anyhow::bail!(
            "the preprocessor failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Hasher::new("kiln preprocessed key v1")
        .digest(&p.key)
        .digest(&Digest::of(&out.stdout))
        .finish())
}

/// The directory of a path as given, `.` for a bare name.
fn parent_of(path: &str) -> String {
    match Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => normalize(&p.to_string_lossy()),
        _ => ".".to_owned(),
    }
}

fn normalized(dirs: &[String]) -> Vec<String> {
    dirs.iter().map(|d| normalize(d)).collect()
}

fn under_any(path: &str, dirs: &[String]) -> bool {
    let path = normalize(path);
    dirs.iter().any(|d| {
        path.strip_prefix(d.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Every header the compile read, from the dependency file kiln or the user asked for. With
/// `-MMD` (system headers left out) the compiler is asked again with `-M`.
fn header_list(
    inv: &Invocation,
    p: &Prepared,
    own_deps: Option<&TempFile>,
) -> Result<Vec<String>, Skip> {
    let c = &p.compile;
    let text = match (own_deps, &c.dep_file) {
        (Some(t), _) => fs::read_to_string(&t.0).context("cannot read the dependency list")?,
        (None, Some(d)) if !d.user_headers_only => {
            fs::read_to_string(inv.cwd.join(&d.path)).context("cannot read the dependency file")?
        }
        _ => {
            let tmp = TempFile::new(&inv.config.dir, ".d")?;
            let mut args = args::without_outputs(&c.args);
            args.extend([
                "-M".to_owned(),
                "-MF".to_owned(),
                tmp.0.to_string_lossy().into_owned(),
            ]);
            let out =
                process::capture(&inv.compiler, &args, None).context("cannot list the headers")?;
            if !out.status.success() {
                return Err(Skip::Error(anyhow::anyhow!(
                    "listing headers with -M failed"
                )));
            }
            fs::read_to_string(&tmp.0).context("cannot read the dependency list")?
        }
    };
    let source = normalize(&c.source);
    Ok(depfile::prerequisites(&text)
        .into_iter()
        .filter(|h| normalize(h) != source)
        .collect())
}

/// Lexical normal form of a path: no `.` components, no repeated or trailing slashes.
fn normalize(p: &str) -> String {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        if c != Component::CurDir {
            out.push(c.as_os_str());
        }
    }
    let s = out.to_string_lossy().into_owned();
    if s.is_empty() {
        ".".to_owned()
    } else {
        s
    }
}

/// Paths where a header of the same name would have been found first, had it existed: for each
/// header, the directories before its own on the include path. Only paths absent now are
/// recorded (one present now was passed over for a reason, such as an include relative to the
/// including file), so a later lookup fails when a new file could shadow a used one. Each is
/// cut back to its first missing component (see [`first_missing`]).
#[allow(clippy::type_complexity)]
fn negative_paths(
    inv: &Invocation,
    p: &Prepared,
    headers: &[String],
    probes: &[(String, Probe)],
) -> (Vec<(String, Option<DirRecord>)>, Vec<String>) {
    const MAX: usize = 4096;
    let c = &p.compile;
    let source_dir = Path::new(&c.source)
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let chain: Vec<String> = std::iter::once(&source_dir)
        .chain(p.search.all())
        .map(|d| normalize(d))
        .collect();
    // `#include "x"` looks in the including file's directory first, and `-include` in the
    // working directory: every such directory could gain a header that shadows a used one.
    let mut includers: Vec<String> = Vec::new();
    let has_forced_include = !c.preprocessor.includes.is_empty();
    let system_headers = normalized(&p.search.system);
    let project_headers = headers.iter().filter(|h| !under_any(h, &system_headers));
    for d in project_headers
        .map(|h| parent_of(h))
        .chain(std::iter::once(normalize(&source_dir)))
    {
        if !includers.contains(&d) {
            includers.push(d);
        }
    }
    if has_forced_include && !includers.iter().any(|d| d == ".") {
        includers.push(".".to_owned());
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut parents = std::collections::HashMap::new();
    let mut existence = std::collections::HashMap::new();
    for h in headers {
        let h = normalize(h);
        // The most specific directory of the chain that holds this header.
        let found = chain
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let rest = if d == "." {
                    Some(h.as_str()).filter(|h| !h.starts_with('/'))
                } else {
                    h.strip_prefix(d.as_str()).and_then(|r| r.strip_prefix('/'))
                };
                rest.map(|r| (i, d.len(), r))
            })
            .max_by_key(|(i, len, _)| (*len, std::cmp::Reverse(*i)));
        let Some((idx, _, rest)) = found else {
            continue;
        };
        let own = &chain[idx];
        for earlier in chain[..idx].iter().chain(&includers) {
            if earlier == own {
                continue;
            }
            if let Some(missing) = first_missing(&inv.cwd, earlier, rest, &mut existence) {
                if seen.insert(missing.clone()) {
                    let parent = dir_record(&inv.cwd, &missing, &mut parents);
                    out.push((missing, parent));
                    if out.len() >= MAX {
                        return (out, Vec::new());
                    }
                }
            }
        }
    }
    // Names tested by `__has_include`: every place along the search path where the name is
    // found must stay, every place where it is not must stay empty.
    let mut positives = Vec::new();
    for (includer, probe) in probes {
        let dirs: Vec<&String> = if probe.name.starts_with('/') {
            Vec::new()
        } else if probe.quoted {
            std::iter::once(includer).chain(&chain).collect()
        } else {
            chain.iter().collect()
        };
        let mut places: Vec<(String, String)> = dirs
            .into_iter()
            .map(|d| {
                let place = if d == "." {
                    probe.name.clone()
                } else {
                    format!("{d}/{}", probe.name)
                };
                (d.clone(), place)
            })
            .collect();
        if probe.name.starts_with('/') {
            places.push(("/".into(), probe.name.clone()));
        }
        for (dir, place) in places {
            if fs::metadata(inv.cwd.join(&place)).is_ok() {
                if !positives.contains(&place) {
                    positives.push(place);
                }
            } else if dir == "/" {
                if seen.insert(place.clone()) {
                    out.push((place, None));
                }
            } else if let Some(missing) = first_missing(
                &inv.cwd,
                &dir,
                place.strip_prefix(&format!("{dir}/")).unwrap_or(&place),
                &mut existence,
            ) {
                if seen.insert(missing.clone()) {
                    let parent = dir_record(&inv.cwd, &missing, &mut parents);
                    out.push((missing, parent));
                }
            }
        }
    }
    (out, positives)
}

/// The fingerprint of the directory `path` would appear in (memoized in `cache`).
fn dir_record(
    cwd: &Path,
    path: &str,
    cache: &mut std::collections::HashMap<String, Option<DirRecord>>,
) -> Option<DirRecord> {
    let parent = match path.rsplit_once('/') {
        Some(("", _)) => "/".to_owned(),
        Some((p, _)) => p.to_owned(),
        None => ".".to_owned(),
    };
    cache
        .entry(parent.clone())
        .or_insert_with(|| {
            let stat = files::stat(&cwd.join(&parent)).ok()?;
            let age = files::nanos(SystemTime::now()) - stat.changed_ns();
            let stable = age >= files::TIMESTAMP_SLACK.as_nanos() as i64;
            Some(DirRecord {
                path: parent,
                stat,
                stable,
            })
        })
        .clone()
}

/// The shortest path under `dir` along `rest` that does not exist, if any. As long as it
/// stays absent, nothing below it can appear, so one `stat` covers a whole subtree: C++'s
/// `bits/*.h` in a directory without `bits/` is a single negative.
///
/// `seen` remembers what exists: headers share their first components (`bits/…`), so most
/// look-ups repeat.
fn first_missing(
    cwd: &Path,
    dir: &str,
    rest: &str,
    seen: &mut std::collections::HashMap<String, bool>,
) -> Option<String> {
    let mut path = if dir == "." {
        String::new()
    } else {
        dir.to_owned()
    };
    for component in rest.split('/') {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(component);
        let exists = match seen.get(&path) {
            Some(e) => *e,
            None => {
                let e = fs::symlink_metadata(cwd.join(&path)).is_ok();
                seen.insert(path.clone(), e);
                e
            }
        };
        if !exists {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/x")),
            Path::new("../b/c")
        );
        assert_eq!(
            relative_path(Path::new("/a"), Path::new("/a")),
            Path::new(".")
        );
        let cwd = Path::new("/home/u/proj/build");
        let base = Some(Path::new("/home/u"));
        let mapped = |p: &str| p.starts_with("/home/u/proj");
        assert_eq!(
            relativize("-I/home/u/proj/include", base, cwd, mapped),
            "-I../include"
        );
        assert_eq!(
            relativize("-ffile-prefix-map=/home/u/proj=.", base, cwd, |_| false),
            "-ffile-prefix-map=..=."
        );
        assert_eq!(relativize("/home/u/proj/a.c", base, cwd, mapped), "../a.c");
        assert_eq!(
            relativize("-I/usr/include", base, cwd, mapped),
            "-I/usr/include"
        );
        assert_eq!(relativize("-I/home/u/x", None, cwd, mapped), "-I/home/u/x");
        // Not mapped: __FILE__ would show the absolute path, so it stays in the key.
        assert_eq!(
            relativize("/home/u/proj/a.c", base, cwd, |_| false),
            "/home/u/proj/a.c"
        );
    }

    #[test]
    fn normal_forms() {
        assert_eq!(normalize("./include//a.h"), "include/a.h");
        assert_eq!(normalize(""), ".");
        assert_eq!(normalize("/usr/include/"), "/usr/include");
    }
}
