//! The keys of the C family's cache entries: the manifest key, from what the command says and
//! the environment, and the preprocessed key of preprocessor mode.
//!
//! Everything that changes the output goes in, and nothing that does not: paths under
//! `base_dir` are hashed relative to the working directory where the output cannot show them.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use kiln_cache::{Digest, Hasher};

use super::c_family::CCompile;
use super::Invocation;
use crate::args::{self, Compile};
use crate::compiler::{Family, Identity};
use crate::env::COMPILER_VARS;
use crate::files::Hashed;
use crate::process;

/// The 15-minute UTC slot a `__DATE__` result belongs to. Every time zone's offset is a
/// multiple of 15 minutes, so the local date never changes within a slot.
pub(super) fn date_slot() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("utc-slot-{}", secs / 900)
}

pub(super) fn manifest_key(
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
pub(super) fn terminal_flags(inv: &Invocation, c: &Compile, family: Family) -> Vec<String> {
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
pub(super) fn hash_path_contents(h: &mut Hasher, path: &Path) {
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
pub(super) fn cpu_identity() -> String {
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
pub(super) fn relativize(
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
pub(super) fn relative_path(path: &Path, from: &Path) -> PathBuf {
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

/// The key of a result in preprocessor mode: the manifest key and the digest of `-E` output.
pub(super) fn preprocessed_key(inv: &Invocation, p: &CCompile) -> anyhow::Result<Digest> {
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
}
