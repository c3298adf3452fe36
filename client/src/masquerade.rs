//! Masquerade links: a directory of links named like compilers (`gcc -> kiln`), first in
//! `PATH`, so that every build tool's compiler calls go through kiln.
//!
//! `make`'s built-in rules call `cc`, not `gcc` (issue 15): a directory linking only `gcc`
//! and `g++` caches nothing under a plain `make`. [`create`] (`kiln masquerade DIR`) makes
//! the usual links at once; and a compile through a link whose directory lacks `cc` or `c++`
//! leaves a note that `kiln stats` turns into a hint, since a compile itself must print
//! nothing of kiln's own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::env::Env;

/// The names `kiln masquerade` links: what build tools call by default.
pub const NAMES: [&str; 6] = ["gcc", "g++", "cc", "c++", "clang", "clang++"];

/// The names `make` and friends call when nothing says otherwise.
const DEFAULT_NAMES: [&str; 2] = ["cc", "c++"];

/// The note `kiln stats` reads, in the cache directory.
const NOTE: &str = "masquerade-hint";

/// What [`create`] did, name by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Created {
    /// New links.
    pub linked: Vec<String>,
    /// Links to kiln that were already there.
    pub present: Vec<String>,
    /// No such compiler in `PATH`: no link, which would only fail.
    pub no_compiler: Vec<String>,
    /// Something else has the name; left alone.
    pub occupied: Vec<String>,
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Links every name of [`NAMES`] whose compiler exists further down `PATH` to `kiln` in
/// `dir`, creating `dir` if needed. Existing files are never replaced.
pub fn create(dir: &Path, kiln: &Path, env: &Env) -> anyhow::Result<Created> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let me = std::fs::metadata(kiln).with_context(|| format!("cannot stat {}", kiln.display()))?;
    let mut out = Created::default();
    for name in NAMES {
        let link = dir.join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(_) if std::fs::metadata(&link).is_ok_and(|m| same_file(&m, &me)) => {
                out.present.push(name.to_owned());
                continue;
            }
            Ok(_) => {
                out.occupied.push(name.to_owned());
                continue;
            }
            Err(_) => {}
        }
        if crate::compiler::find(name, env, kiln).is_err() {
            out.no_compiler.push(name.to_owned());
            continue;
        }
        std::os::unix::fs::symlink(kiln, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), kiln.display()))?;
        out.linked.push(name.to_owned());
    }
    Ok(out)
}

/// The directory in `PATH` whose `name` is kiln: the masquerade link this process was called
/// through. Stops at the first match, which is usually the first directory.
pub fn link_dir(name: &str, env: &Env, kiln: &Path) -> Option<PathBuf> {
    let me = std::fs::metadata(kiln).ok()?;
    std::env::split_paths(env.os("PATH")?)
        .find(|dir| std::fs::metadata(dir.join(name)).is_ok_and(|m| same_file(&m, &me)))
}

/// After a compile through the masquerade link `name`: when its directory lacks `cc` or `c++`
/// links, leave a note for `kiln stats` (once; an existing note is not rewritten).
pub fn note_missing(cache_dir: &Path, name: &str, env: &Env, kiln: &Path) {
    let note = cache_dir.join(NOTE);
    if note.exists() {
        return;
    }
    let Some(dir) = link_dir(name, env, kiln) else {
        return;
    };
    if !missing(&dir, kiln).is_empty() {
        let _ = std::fs::write(&note, dir.as_os_str().as_encoded_bytes());
    }
}

/// The default names not linked to kiln in `dir`.
fn missing(dir: &Path, kiln: &Path) -> Vec<&'static str> {
    let me = std::fs::metadata(kiln).ok();
    DEFAULT_NAMES
        .into_iter()
        .filter(|n| {
            let m = std::fs::metadata(dir.join(n)).ok();
            !matches!((m, &me), (Some(m), Some(me)) if same_file(&m, me))
        })
        .collect()
}

/// The hint `kiln stats` prints while a noted masquerade directory still lacks links; the
/// note goes once they are there.
pub fn hint(cache_dir: &Path, kiln: &Path) -> Option<String> {
    let note = cache_dir.join(NOTE);
    let dir = PathBuf::from(std::fs::read_to_string(&note).ok()?);
    let missing = missing(&dir, kiln);
    if missing.is_empty() {
        let _ = std::fs::remove_file(&note);
        return None;
    }
    Some(format!(
        "Hint: the masquerade directory {dir} has no {names} link, which make's built-in rules \
         call, so those compiles bypass kiln; `kiln masquerade {dir}` adds the usual links.\n",
        dir = dir.display(),
        names = missing.join(" or "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_only_installed_compilers_and_never_replaces_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let kiln = tmp.path().join("kiln");
        std::fs::write(&kiln, "#!/bin/sh\n").unwrap();
        // A fake PATH with gcc and cc as compilers.
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for c in ["gcc", "cc"] {
            std::fs::write(bin.join(c), "#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(bin.join(c), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let links = tmp.path().join("links");
        std::fs::create_dir(&links).unwrap();
        std::fs::write(links.join("cc"), "mine").unwrap();
        let env = Env::from_pairs([("PATH", format!("{}:{}", links.display(), bin.display()))]);
        let done = create(&links, &kiln, &env).unwrap();
        assert_eq!(done.linked, ["gcc"]);
        assert_eq!(done.occupied, ["cc"]);
        assert_eq!(done.no_compiler, ["g++", "c++", "clang", "clang++"]);
        assert_eq!(std::fs::read_to_string(links.join("cc")).unwrap(), "mine");
        // Again: the link is there.
        assert_eq!(create(&links, &kiln, &env).unwrap().present, ["gcc"]);

        // A compile through `gcc` in a directory without cc/c++ links leaves a note, and
        // kiln stats hints until both are there.
        let cache = tmp.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        assert_eq!(link_dir("gcc", &env, &kiln), Some(links.clone()));
        note_missing(&cache, "gcc", &env, &kiln);
        let h = hint(&cache, &kiln).unwrap();
        assert!(
            h.contains("cc or c++") && h.contains("kiln masquerade"),
            "{h}"
        );
        std::fs::remove_file(links.join("cc")).unwrap();
        std::os::unix::fs::symlink(&kiln, links.join("cc")).unwrap();
        std::os::unix::fs::symlink(&kiln, links.join("c++")).unwrap();
        assert_eq!(hint(&cache, &kiln), None);
        assert!(!cache.join(NOTE).exists());
    }
}
