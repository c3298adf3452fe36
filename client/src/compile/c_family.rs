//! The C family: C, C++ and Objective-C through gcc and clang.
//!
//! Its compile is read by [`crate::args`], searches headers along [`SearchPath`], is keyed by
//! [`key::manifest_key`], and learns the headers it read from a dependency file, which
//! [`store`] records in the manifest with the paths that could shadow them ([`shadow`]).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_cache::{Digest, Kind};

use super::farm;
use super::tiers::Tiers;
use super::{
    key, replay, shadow, store, uncacheable_by, write_output, Command, Family, Invocation, Ran,
    Skip, Started, TempFile, Why,
};
use crate::args::{self, Compile, Reason};
use crate::closure;
use crate::compiler::{self, Family as Driver, Identity};
use crate::dist::Fallback;
use crate::env::SIDE_OUTPUT_VARS;
use crate::files::{self, Hashed};
use crate::manifest::Manifest;
use crate::remote;
use crate::result::{CompileResult, Part};
use crate::search_path::SearchPath;
use crate::toolchain;

/// A C-family compile classified and keyed, ready for the tiers.
pub(super) struct CCompile {
    pub compile: Compile,
    pub identity: Identity,
    pub search: SearchPath,
    pub source: Hashed,
    pub key: Digest,
}

impl Family for CCompile {
    fn prepare(inv: &Invocation) -> Result<CCompile, Skip> {
        prepare(inv)
    }

    fn key(&self) -> &Digest {
        &self.key
    }

    fn source(&self) -> &str {
        &self.compile.source
    }

    fn lookup(&self, inv: &Invocation, tiers: &mut Tiers) -> anyhow::Result<Option<CompileResult>> {
        lookup(inv, tiers, self)
    }

    fn deliver(&self, inv: &Invocation, r: &CompileResult) -> anyhow::Result<()> {
        deliver(inv, &self.compile, r)
    }

    fn command(&self, inv: &Invocation) -> anyhow::Result<Command> {
        let c = &self.compile;
        // The arguments as given (an `@file` stays a file: expanded, it may be too long for a
        // command line), then kiln's own. `prepare` checked they are UTF-8.
        let mut args: Vec<String> = inv
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        // Without a dependency file of the user's, kiln asks for its own: the headers read.
        let scratch = if c.dep_file.is_none() && c.lang.preprocessed() {
            let t = TempFile::new(&inv.config.dir, ".d")?;
            args.extend([
                "-MD".to_owned(),
                "-MF".to_owned(),
                t.0.to_string_lossy().into_owned(),
            ]);
            Some(t)
        } else {
            None
        };
        if let Some(d) = &c.dep_file {
            if d.add_mf {
                args.extend(["-MF".to_owned(), d.path.to_string_lossy().into_owned()]);
            }
        }
        args.extend(key::terminal_flags(inv, c, self.identity.family));
        Ok(Command { args, scratch })
    }

    fn farm_job(&self, inv: &Invocation, cmd: &Command) -> Result<farm::Job, Fallback> {
        let cfg = inv.config;
        let c = &self.compile;
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
                &self.identity.digest(),
                inv.stderr_tty,
            ),
        }
        .map_err(|e| Fallback::Toolchain(format!("{e:#}")))?;
        let inputs = match closure::scan(c, &self.search, &inv.cwd) {
            Ok(found) => found,
            // The preprocessor lists what a computed include or a moved search path reads.
            Err(
                why @ (closure::Unresolvable::Computed { .. } | closure::Unresolvable::Option(_)),
            ) => {
                tracing::debug!("{why}; asking the preprocessor for the headers");
                closure::from_preprocessor(&inv.compiler, c, &self.search, &inv.cwd)
                    .map_err(|e| Fallback::Inputs(format!("{e:#}")))?
            }
            // Probes it does not list, and paths it cannot place: this compile stays here.
            Err(why) => return Err(Fallback::Inputs(why.to_string())),
        };
        tracing::debug!(
            toolchain_ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
            files = inputs.files.len(),
            "toolchain and closure ready"
        );
        let cwd = &inv.cwd;
        let mut outputs = vec![cwd.join(&c.output)];
        if let Some(d) = &c.dep_file {
            outputs.push(cwd.join(&d.path));
        }
        if let Some(own) = &cmd.scratch {
            outputs.push(cwd.join(&own.0));
        }
        if c.split_dwarf {
            outputs.push(cwd.join(args::dwo_path(&c.output)));
        }
        let mut argv = vec![inv.compiler.to_string_lossy().into_owned()];
        argv.extend(cmd.args.iter().cloned());
        Ok(farm::Job {
            toolchain,
            argv,
            inputs,
            outputs,
            source: cwd.join(&c.source),
        })
    }

    fn store(
        &self,
        inv: &Invocation,
        tiers: &mut Tiers,
        cmd: &Command,
        started: Started,
        ran: Ran<'_>,
    ) -> Result<(), Skip> {
        store::store_result(inv, tiers, self, cmd.scratch.as_ref(), started, ran)
    }
}

fn prepare(inv: &Invocation) -> Result<CCompile, Skip> {
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
    let key = key::manifest_key(inv, &compile, &identity, &source)?;
    Ok(CCompile {
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
    family: Driver,
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
    if family == Driver::Gcc {
        if let Some(first) = closure::first_include(source) {
            let source_dir = shadow::parent_of(&c.source);
            if found_near(&first, &source_dir, &[".gch"]) {
                return true;
            }
        }
    }
    false
}

fn lookup(
    inv: &Invocation,
    tiers: &mut Tiers,
    p: &CCompile,
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
        let key = key::preprocessed_key(inv, p)?;
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
    let found = match manifest.lookup(&inv.cwd, &key::date_slot()) {
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
                manifest.lookup(&inv.cwd, &key::date_slot())
            });
            match found {
                Some(found) => {
                    let _ = tiers.store.put(Kind::Manifest, &p.key, &manifest.encode());
                    found
                }
                None => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        tracing::debug!(
                            "miss: {}",
                            manifest.explain_miss(&inv.cwd, &key::date_slot())
                        );
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
