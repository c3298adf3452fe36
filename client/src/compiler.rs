//! Finding the real compiler and knowing who it is.
//!
//! A compiler's identity is the digest of its binary and its `--version` text. Hashing a
//! binary costs milliseconds, so the identity is remembered in `DIR/compilers/` by path, size,
//! mtime and ctime, and recomputed only when one of them changes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kiln_cache::{Digest, Hasher};
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::files::{self, Stat};
use crate::process;

/// The compiler family, which decides a few spellings (colour flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Gcc,
    Clang,
}

/// Who a compiler is, and what it searches by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The resolved binary.
    pub path: PathBuf,
    pub family: Family,
    /// Digest of the binary and its version text.
    pub digest: String,
    /// `--version`, first line.
    pub version: String,
    /// The compiler's own include directories for C and C++, in search order.
    pub c_dirs: Vec<String>,
    pub cxx_dirs: Vec<String>,
    /// The binary's stat when this record was made.
    stat: Stat,
}

impl Identity {
    pub fn digest(&self) -> Digest {
        self.digest.parse().unwrap_or(Digest([0; 32]))
    }
}

/// Finds the compiler to run for `name`. A name with a slash is used as it is, unless it is
/// kiln itself (a masquerade link called by path), in which case PATH is searched for its base
/// name. Candidates that are kiln are skipped, so a masquerade link first in PATH never runs
/// itself.
pub fn find(name: &str, env: &Env, self_exe: &Path) -> anyhow::Result<PathBuf> {
    // Compare files by device and inode, which follows every link at the cost of one stat.
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let me = std::fs::metadata(self_exe).map(|m| id(&m)).ok();
    let is_me = |m: &std::fs::Metadata| Some(id(m)) == me;
    let base = if name.contains('/') {
        let p = PathBuf::from(name);
        if !std::fs::metadata(&p).is_ok_and(|m| is_me(&m)) {
            return Ok(p);
        }
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        name.to_owned()
    };
    if let Some(found) = env.find_program(&base, |_, m| !is_me(m)) {
        return Ok(found);
    }
    bail!("cannot find the compiler {base:?} in PATH (kiln wraps a compiler: `kiln gcc -c foo.c`)")
}

/// The identity of the compiler at `path`, from the record in `dir` when the binary has not
/// changed, otherwise computed and recorded.
pub fn identify(path: &Path, dir: &Path) -> anyhow::Result<Identity> {
    // The stat of `path` follows its links: an unchanged record means the same binary, without
    // resolving the chain of links on every compile.
    let stat =
        files::stat(path).with_context(|| format!("cannot stat compiler {}", path.display()))?;
    let record = dir
        .join("compilers")
        .join(Digest::of(path.as_os_str().as_encoded_bytes()).to_hex());
    if let Ok(text) = std::fs::read(&record) {
        if let Ok(id) = serde_json::from_slice::<Identity>(&text) {
            if id.stat == stat {
                return Ok(id);
            }
        }
    }
    let resolved = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve compiler {}", path.display()))?;
    let id = probe(path, &resolved, stat)?;
    let json = serde_json::to_vec_pretty(&id)?;
    // Best effort: failing to remember only costs time next run.
    if let Err(e) = kiln_cache::write_atomically(&record, &json) {
        tracing::debug!(error = %e, "cannot record compiler identity");
    }
    Ok(id)
}

fn probe(path: &Path, resolved: &Path, stat: Stat) -> anyhow::Result<Identity> {
    let binary = files::hash_file(resolved)
        .with_context(|| format!("cannot read compiler {}", resolved.display()))?;
    let out = process::capture(path, &["--version".to_owned()], None)
        .with_context(|| format!("cannot run {} --version", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} --version failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let version_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let family = if version_text.contains("clang") {
        Family::Clang
    } else {
        Family::Gcc
    };
    let digest = Hasher::new("kiln compiler identity v1")
        .digest(&binary.digest)
        .str(&version_text)
        .finish();
    Ok(Identity {
        path: resolved.to_path_buf(),
        family,
        digest: digest.to_hex(),
        version: version_text.lines().next().unwrap_or("").to_owned(),
        c_dirs: search_dirs(path, "c"),
        cxx_dirs: search_dirs(path, "c++"),
        stat,
    })
}

/// The compiler's default `#include <...>` directories for a language, from `-E -v`.
/// Empty when the compiler cannot say (no C++ front end, say).
fn search_dirs(path: &Path, lang: &str) -> Vec<String> {
    let args = ["-x", lang, "-E", "-v", "/dev/null", "-o", "/dev/null"].map(String::from);
    let Ok(out) = process::probe(path, &args) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stderr);
    let mut dirs = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("#include <...> search starts here") {
            inside = true;
        } else if line.starts_with("End of search list") {
            break;
        } else if inside {
            let dir = line.trim().trim_end_matches(" (framework directory)");
            let normal = std::fs::canonicalize(dir).map(|p| p.to_string_lossy().into_owned());
            dirs.push(normal.unwrap_or_else(|_| dir.to_owned()));
        }
    }
    dirs
}
