//! Storing a C-family miss: the result under its result key, and in the manifest what the
//! compile read (each header with its digest and stat) and what must stay absent for a later
//! hit to be right.

use std::fs;
use std::path::Path;

use anyhow::Context;
use kiln_cache::{Hasher, Kind, Lookup};

use super::c_family::CCompile;
use super::tiers::{push_entries, Tiers};
use super::{key, shadow, uncacheable_by, Invocation, Ran, Skip, Started, TempFile};
use crate::args::{self, Reason};
use crate::closure::{self, Probe};
use crate::compiler::Family;
use crate::depfile;
use crate::files::{self, Scan};
use crate::manifest::{FileRecord, Manifest};
use crate::process;
use crate::result::{CompileResult, Part};

pub(super) fn store_result(
    inv: &Invocation,
    tiers: &mut Tiers,
    p: &CCompile,
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
    let system = shadow::normalized(&p.search.system);
    let mut probes: Vec<(String, Probe)> = Vec::new();
    // The first file whose `__has_include` cannot be followed, and that call.
    let mut untrusted: Option<String> = None;
    let mut note_probes = |path: &str, data: &[u8], scan: Scan| {
        if scan.has_include && !shadow::under_any(path, &system) {
            match closure::include_probes(data) {
                Ok(found) => {
                    probes.extend(found.into_iter().map(|pr| (shadow::parent_of(path), pr)))
                }
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
    let date = scan.date.then(key::date_slot);

    if let Some(why) = &untrusted {
        tracing::debug!("preprocessor mode: {why}");
    }
    let result_key = if untrusted.is_some() {
        // A `__has_include` kiln cannot follow: the output depends on files that may not
        // exist and that nothing names. Key this result by the preprocessor's output, as
        // ccache's preprocessor mode does.
        key::preprocessed_key(inv, p)?
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
        let (negatives, positives) = shadow::negative_paths(inv, p, &headers, &probes);
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

pub(super) fn read_output(cwd: &Path, path: &Path) -> Result<Vec<u8>, Skip> {
    let full = cwd.join(path);
    fs::read(&full)
        .with_context(|| format!("cannot read compiler output {}", full.display()))
        .map_err(Skip::Error)
}

/// Every header the compile read, from the dependency file kiln or the user asked for. With
/// `-MMD` (system headers left out) the compiler is asked again with `-M`.
pub(super) fn header_list(
    inv: &Invocation,
    p: &CCompile,
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
    let source = shadow::normalize(&c.source);
    Ok(depfile::prerequisites(&text)
        .into_iter()
        .filter(|h| shadow::normalize(h) != source)
        .collect())
}
