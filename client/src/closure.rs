//! The include closure of a compile: every file its preprocessor may read, for the farm.
//!
//! A builder runs the compile in a jail that holds the toolchain archive ([`crate::toolchain`])
//! and the job's input files, placed at their original absolute paths; the same command runs in
//! the same working directory. [`scan`] lists those inputs without running the preprocessor: it
//! reads each file once and follows `#include`, `#include_next`, `#import`, `#embed` and the
//! operands of `__has_include`, `__has_include_next` and `__has_embed`.
//!
//! The rules, and why:
//!
//! - **A superset.** A file missing on the builder breaks the remote compile and costs a local
//!   rerun; an extra one costs one transfer per builder, which keeps files by content. So
//!   conditionals are ignored (every branch counts), and for each name *every* existing
//!   candidate along the search path is shipped, not just the first: which one the compiler
//!   takes depends on the branches taken and on `#include_next`, which a scan does not know.
//!   Since all candidates count, the order of the search path does not matter, only its members.
//! - **The same answer to every lookup.** A lookup that fails here must fail on the builder too,
//!   or a `#include_next` or `__has_include` could find something else there. The jail holds
//!   only shipped files, created directories and the toolchain, so it is a subset of this
//!   machine; a nonexistent include directory is therefore never created (gcc drops it, but
//!   `#include "../x.h"` relative to it would start to resolve).
//! - **Probes are inputs.** A `__has_include` that finds a file here and nothing on the builder
//!   would silently change the object, so probed files are shipped (not scanned: only their
//!   existence counts).
//! - **The compiler's private headers stay home.** gcc's `lib/gcc/<target>/<version>/include`
//!   and clang's resource directory travel in the toolchain archive (see [`crate::search_path::is_toolchain_dir`]).
//!   They are still read, because they include libc's headers (`mm_malloc.h` includes
//!   `<stdlib.h>`, `stdint.h` does `#include_next <stdint.h>`).
//! - **Paths as the compiler spells them.** A candidate is the search directory joined with the
//!   name, made absolute against the working directory. `..` is resolved lexically, because the
//!   builder refuses it and because in the jail every directory is real: `inc/../x.h` there is
//!   `x.h` beside `inc`, while here, with `inc` a symbolic link, it is beside the link's target.
//!   Each `..` is therefore checked (see [`resolve_dots`]); where the two differ the compile is
//!   [`Unresolvable::SymlinkDotDot`], and the directory before the `..` is listed to be created.
//! - **What a scan cannot follow is said, not guessed.** `#include MACRO` is expanded from the
//!   macro's definitions, all of them (in any file read, `-D`), when each is a plain header name
//!   or another macro. A macro defined nowhere names nothing: that `#include` is in a dead
//!   branch or fails here and on the builder alike (only the compiler's own `__FILE__` and kin
//!   are defined without a `#define`). Anything else is [`Unresolvable::Computed`], and the
//!   caller can ask the compiler instead with [`from_preprocessor`] (`-M`), which lists the
//!   includes but not the probes, so probes are still scanned there.
//!
//! The scan also lists the directories the jail must have: the working directory, every search
//! directory that exists here outside the toolchain, and the directories before a `..`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use kiln_cache::Digest;
use memchr::{memchr, memchr3, memmem};

use crate::args::{self, Compile};
use crate::depfile;
use crate::files;
use crate::process;
use crate::search_path::SearchPath;

/// What a builder needs beside the toolchain to run one compile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// Absolute paths, sorted, without duplicates: the source, forced includes, every header
    /// candidate and probed file outside the toolchain.
    pub files: Vec<PathBuf>,
    /// What the scan read of the listed files, with the stat taken before the read: the job
    /// need not read and hash them again, nor the cache after the compile while their stat is
    /// unchanged.
    pub read: HashMap<PathBuf, files::Hashed>,
    /// Absolute directories to create, sorted: the working directory, the search directories
    /// that exist here outside the toolchain, and those that a `..` steps out of.
    pub dirs: Vec<PathBuf>,
}

/// Why a scan cannot list a compile's inputs. The caller decides: [`from_preprocessor`] for a
/// computed include, a local compile for the rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolvable {
    /// `#include MACRO` with a definition that is not a plain header name, or a macro the
    /// compiler defines itself (`__FILE__`).
    #[error(
        "{}:{line}: `#include {name}` is computed by a macro the scan cannot expand; \
         the preprocessor (-M) can list the headers",
        file.display()
    )]
    Computed {
        file: PathBuf,
        line: u32,
        name: String,
    },
    /// `__has_include(MACRO)` (or `#embed MACRO`) that cannot be expanded. `-M` does not list
    /// probes, so only a local compile is safe.
    #[error(
        "{}:{line}: `{name}` names a file for `__has_include` or `#embed` through a macro the \
         scan cannot expand; compile locally",
        file.display()
    )]
    ComputedProbe {
        file: PathBuf,
        line: u32,
        name: String,
    },
    /// An option that moves the compiler's own include directories (`--sysroot`, `-iprefix`,
    /// `-stdlib=`, `-m32`...), which the scan does not model; `-M -v` reports the real ones.
    #[error("{0} changes the compiler's include directories; the preprocessor (-M) can list the headers")]
    Option(String),
    /// A path whose `..` leaves through a symbolic link: the builder, where every directory is
    /// real, would resolve it elsewhere.
    #[error(
        "{}: `..` after a symbolic link leads somewhere else than the path without it; \
         a builder cannot reproduce that, compile locally",
        .0.display()
    )]
    SymlinkDotDot(PathBuf),
    /// A file the compiler would try exists but cannot be read (so the local compile fails in
    /// a way the builder, which would not have it, cannot reproduce).
    #[error("cannot read {}: {error}", path.display())]
    Unreadable { path: PathBuf, error: String },
}

/// Lists the files `compile` may read along `path`, by scanning; `cwd` is the compile's
/// working directory.
pub fn scan(compile: &Compile, path: &SearchPath, cwd: &Path) -> Result<Closure, Unresolvable> {
    let pre = &compile.preprocessor;
    if let Some(option) = &pre.unscannable {
        return Err(Unresolvable::Option(option.clone()));
    }
    let search = Search::new(cwd, &path.quote, &path.chain, path.private.clone())?;
    let mut scanner = Scanner::new(&search, false, &command_line_defines(&pre.defines));
    scanner.roots(compile, cwd, &forced(compile))?;
    scanner.run()?;
    Ok(scanner.closure(cwd))
}

/// Lists the files `compile` reads by asking `compiler` (as the user named it: `clang++` and
/// `clang` are one binary with two behaviours) with `-M -v`, and adds what `-M` leaves out:
/// the files `__has_include` probes, found by scanning every listed file against the search
/// path `-v` reports. The compiler runs in this process's working directory, which must be
/// `cwd` (kiln runs where the build ran it).
pub fn from_preprocessor(
    compiler: &Path,
    compile: &Compile,
    path: &SearchPath,
    cwd: &Path,
) -> anyhow::Result<Closure> {
    let here = std::env::current_dir().context("cannot read the working directory")?;
    anyhow::ensure!(
        same_file(&here, cwd),
        "the compiler would run in {} rather than the compile's directory {}",
        here.display(),
        cwd.display()
    );
    let mut args = args::without_outputs(&compile.args);
    args.extend(["-M".to_owned(), "-v".to_owned()]);
    let out = process::capture(compiler, &args, None)
        .with_context(|| format!("cannot run {} -M", compiler.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        anyhow::bail!(
            "{} -M failed: {}",
            compiler.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    let (quote, angle) = search_lists(&stderr).with_context(|| {
        format!(
            "{} -M -v printed no include search list",
            compiler.display()
        )
    })?;
    // `-v` gives the search path, but which of its directories are the toolchain's is still
    // the identity's to say (an option like -stdlib moves libraries, not the compiler).
    let search = Search::new(cwd, &quote, &angle, path.private.clone())?;
    let mut scanner = Scanner::new(
        &search,
        true,
        &command_line_defines(&compile.preprocessor.defines),
    );
    scanner.roots(compile, cwd, &forced(compile))?;
    for dep in depfile::prerequisites(&String::from_utf8_lossy(&out.stdout)) {
        let path = cwd.join(&dep);
        if scanner.probe(path, How::Include)?.is_none() {
            anyhow::bail!("{dep}, listed by {} -M, cannot be read", compiler.display());
        }
    }
    scanner.run()?;
    Ok(scanner.closure(cwd))
}

/// The files the command line includes before the source: `-imacros`, then `-include`.
fn forced(compile: &Compile) -> Vec<String> {
    let pre = &compile.preprocessor;
    pre.imacros.iter().chain(&pre.includes).cloned().collect()
}

/// The object-like `-D` macros, which an `#include MACRO` may name (a function-like one
/// cannot be an include's operand by itself).
fn command_line_defines(defines: &[String]) -> Vec<(Vec<u8>, Body)> {
    defines
        .iter()
        .map(|d| d.split_once('=').unwrap_or((d, "1")))
        .filter(|(name, _)| !name.contains('('))
        .map(|(name, body)| (name.as_bytes().to_vec(), Body::of(body.as_bytes())))
        .collect()
}

/// The `#include "..."` and `#include <...>` directory lists of `-v` output.
fn search_lists(stderr: &str) -> Option<(Vec<String>, Vec<String>)> {
    let mut quote = Vec::new();
    let mut angle = Vec::new();
    let mut into: Option<&mut Vec<String>> = None;
    let mut complete = false;
    for line in stderr.lines() {
        if line.starts_with("#include \"...\" search starts here") {
            into = Some(&mut quote);
        } else if line.starts_with("#include <...> search starts here") {
            into = Some(&mut angle);
        } else if line.starts_with("End of search list") {
            complete = true;
            break;
        } else if let Some(list) = into.as_mut() {
            if let Some(dir) = line.strip_prefix(' ') {
                list.push(dir.trim_end_matches(" (framework directory)").to_owned());
            }
        }
    }
    complete.then_some((quote, angle))
}

/// The directories a compile searches, absolute and normalized, existing ones only.
#[derive(Debug)]
struct Search {
    /// `-iquote`: for `#include "..."` only, after the including file's directory.
    quote: Vec<PathBuf>,
    /// Every directory searched for `<...>` (and after `quote` for `"..."`), the toolchain's
    /// own included: their headers are read, not shipped.
    chain: Vec<PathBuf>,
    private: Vec<PathBuf>,
    /// The search directories outside the toolchain and the `..` prefixes met on the way.
    dirs: BTreeSet<PathBuf>,
}

impl Search {
    fn new(
        cwd: &Path,
        quote: &[impl AsRef<str>],
        chain: &[impl AsRef<str>],
        private: Vec<PathBuf>,
    ) -> Result<Search, Unresolvable> {
        let mut search = Search {
            quote: Vec::new(),
            chain: Vec::new(),
            private,
            dirs: BTreeSet::new(),
        };
        let mut seen = HashSet::new();
        let dirs = quote
            .iter()
            .map(|d| (d.as_ref(), true))
            .chain(chain.iter().map(|d| (d.as_ref(), false)));
        for (given, is_quote) in dirs {
            // gcc drops a directory that does not exist; so must the jail (see the module doc).
            let Some((dir, prefixes)) = resolve_dots(&cwd.join(given))? else {
                continue;
            };
            if !std::fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if !search.is_private(&dir) {
                search.dirs.extend(prefixes);
                search.dirs.insert(dir.clone());
            }
            if seen.insert((dir.clone(), is_quote)) {
                if is_quote {
                    search.quote.push(dir);
                } else {
                    search.chain.push(dir);
                }
            }
        }
        Ok(search)
    }

    fn is_private(&self, path: &Path) -> bool {
        self.private.iter().any(|p| path.starts_with(p))
    }
}

/// Why a file is looked up: a header is scanned in turn, a probed or embedded file is not (only
/// its existence or its bytes count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum How {
    Include,
    Probe,
}

/// A directive's or probe's operand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Operand {
    Quoted(Vec<u8>),
    Angle(Vec<u8>),
    /// One identifier, to expand.
    Macro(Vec<u8>),
    /// Anything else: a function-like macro call, several tokens.
    Complex(Vec<u8>),
}

/// An object-like macro's replacement, as far as `#include MACRO` cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Body {
    /// `"x.h"` or `<x.h>` (only these two operands).
    Header(Operand),
    /// Another macro's name.
    Alias(Vec<u8>),
    Other,
}

impl Body {
    fn of(text: &[u8]) -> Body {
        let t = trim(text);
        match classify(t) {
            Operand::Macro(name) => Body::Alias(name),
            op @ (Operand::Quoted(_) | Operand::Angle(_)) => Body::Header(op),
            Operand::Complex(_) => Body::Other,
        }
    }
}

/// A reference to another file found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ref {
    how: How,
    operand: Operand,
    /// 1-based; counted only for operands that may end in an error.
    line: u32,
}

/// A function-like macro that applies `__has_include` (or another wrapper) to a parameter:
/// `#define HAS_INCLUDE(x) __has_include(x)`, as portable libraries write it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wrapper {
    name: Vec<u8>,
    param: usize,
}

/// What one read of a file found.
#[derive(Debug, Default)]
struct Found {
    refs: Vec<Ref>,
    /// Definitions of the wanted macros.
    defines: Vec<(Vec<u8>, Body)>,
    wrappers: Vec<Wrapper>,
}

#[derive(Debug)]
struct FileInfo {
    path: PathBuf,
    private: bool,
    /// Read for directives (a probed file is not, until something includes it).
    scanned: bool,
    /// How many wanted macros and wrappers were known when it was read: fewer than now means
    /// it must be read again.
    wanted_seen: usize,
    wrappers_seen: usize,
    stat: Option<StatRead>,
    /// What was read, for shipping (not for the toolchain's own files).
    read: Option<files::Hashed>,
}

/// The stat before a read, and whether the file had been still for the timestamp slack.
type StatRead = (files::Stat, bool);
/// A file found: its content (when read) and [`StatRead`].
type Opened = (Vec<u8>, Option<StatRead>);

/// An `#include MACRO` or `__has_include(MACRO)` waiting for the macro's definitions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pending {
    file: u32,
    how: How,
    name: Vec<u8>,
    line: u32,
}

/// The walk over files. Everything is memoized: a path is read at most once (a file included
/// from a hundred headers costs one hash lookup after the first), and each name is looked up
/// along the search path once per kind.
#[derive(Debug)]
struct Scanner<'s> {
    search: &'s Search,
    /// `-M` listed the real includes: a computed one the scan cannot expand is covered.
    listed: bool,
    files: Vec<FileInfo>,
    /// By path bytes (hashing a `Path` walks its components).
    by_path: FxMap<Vec<u8>, Option<u32>>,
    /// Names already looked up along the search path, by a bit per (quoted, how).
    looked_up: FxMap<Vec<u8>, u8>,
    work: Vec<(u32, Vec<u8>)>,
    /// Macros named by computed includes (and those they name): their definitions are kept.
    wanted: FxSet<Vec<u8>>,
    wanted_order: usize,
    defines: FxMap<Vec<u8>, Vec<Body>>,
    wrappers: Vec<Wrapper>,
    pending: Vec<Pending>,
    pending_seen: FxSet<(u32, How, Vec<u8>)>,
    /// Directories before a `..` in shipped paths.
    dirs: BTreeSet<PathBuf>,
    /// Whether a candidate's directory exists: `<bits/x.h>` is tried in every search
    /// directory, most of which have no `bits/`; one `stat` of the directory answers for all
    /// its names (by the file system's own lookup, so case folding and all).
    parents: FxMap<Vec<u8>, bool>,
}

impl<'s> Scanner<'s> {
    fn new(search: &'s Search, listed: bool, defines: &[(Vec<u8>, Body)]) -> Scanner<'s> {
        let mut map: FxMap<Vec<u8>, Vec<Body>> = FxMap::default();
        for (name, body) in defines {
            map.entry(name.clone()).or_default().push(body.clone());
        }
        Scanner {
            search,
            listed,
            files: Vec::new(),
            by_path: FxMap::default(),
            looked_up: FxMap::default(),
            work: Vec::new(),
            wanted: FxSet::default(),
            wanted_order: 0,
            defines: map,
            wrappers: Vec::new(),
            pending: Vec::new(),
            pending_seen: FxSet::default(),
            dirs: BTreeSet::new(),
            parents: FxMap::default(),
        }
    }

    /// The source, the forced includes and gcc's implicit `stdc-predef.h`.
    fn roots(
        &mut self,
        compile: &Compile,
        cwd: &Path,
        forced: &[String],
    ) -> Result<(), Unresolvable> {
        let source = cwd.join(&compile.source);
        let how = if compile.lang.preprocessed() {
            How::Include
        } else {
            How::Probe
        };
        if self.probe(source.clone(), how)?.is_none() {
            return Err(Unresolvable::Unreadable {
                path: source,
                error: "not found".to_owned(),
            });
        }
        if !compile.lang.preprocessed() {
            return Ok(());
        }
        // `-include f` looks in the working directory first, then along the `"..."` chain.
        for f in forced {
            self.lookup(Some(cwd), true, f.as_bytes(), How::Include)?;
        }
        // gcc on glibc pre-includes it unless -ffreestanding or -nostdinc; shipping it when it
        // is not read costs nothing.
        self.lookup(None, false, b"stdc-predef.h", How::Include)
    }

    /// Follows every reference to a fixpoint: computed includes are expanded once every file
    /// that could define their macros has been read (a definition may sit in a file found
    /// later, and expanding can find more files).
    fn run(&mut self) -> Result<(), Unresolvable> {
        loop {
            loop {
                while let Some((file, data)) = self.work.pop() {
                    self.read(file, &data)?;
                    let f = &mut self.files[file as usize];
                    if let (None, Some((stat, stable)), false) = (&f.read, f.stat, f.private) {
                        f.read = Some(files::Hashed {
                            digest: Digest::of(&data),
                            stat,
                            stable,
                            data,
                        });
                    }
                }
                // Files read before a wanted macro or a wrapper was known are read again.
                let stale: Vec<u32> = (0..self.files.len() as u32)
                    .filter(|&i| {
                        let f = &self.files[i as usize];
                        f.scanned
                            && (f.wanted_seen < self.wanted_order
                                || f.wrappers_seen < self.wrappers.len())
                    })
                    .collect();
                if stale.is_empty() {
                    break;
                }
                for file in stale {
                    let data = read_file(&self.files[file as usize].path)?;
                    self.read(file, &data)?;
                }
            }
            if !self.expand_pending(false)? && self.work.is_empty() {
                return self.expand_pending(true).map(drop);
            }
        }
    }

    /// Expands every pending macro with the definitions known. Returns whether it asked for
    /// more (new macros to look for). With `last`, what cannot be expanded is an error.
    fn expand_pending(&mut self, last: bool) -> Result<bool, Unresolvable> {
        let mut grew = false;
        let pending = std::mem::take(&mut self.pending);
        let mut result = Ok(());
        for p in &pending {
            let mut ex = Expansion::default();
            self.expand(&p.name, &mut Vec::new(), &mut ex);
            for name in ex.visited {
                if self.wanted.insert(name) {
                    self.wanted_order += 1;
                    grew = true;
                }
            }
            let fatal = p.how == How::Probe || !self.listed;
            if (ex.complex || (last && ex.builtin)) && fatal {
                result = Err(self.computed_error(p));
                break;
            }
            for op in ex.ops {
                let dir = self.files[p.file as usize]
                    .path
                    .parent()
                    .map(Path::to_owned);
                let step = match op {
                    Operand::Quoted(n) => self.lookup(dir.as_deref(), true, &n, p.how),
                    Operand::Angle(n) => self.lookup(None, false, &n, p.how),
                    _ => Ok(()),
                };
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
        }
        self.pending = pending;
        result.map(|()| grew)
    }

    fn computed_error(&self, p: &Pending) -> Unresolvable {
        let file = self.files[p.file as usize].path.clone();
        let name = String::from_utf8_lossy(&p.name).into_owned();
        match p.how {
            How::Include => Unresolvable::Computed {
                file,
                line: p.line,
                name,
            },
            How::Probe => Unresolvable::ComputedProbe {
                file,
                line: p.line,
                name,
            },
        }
    }

    /// The definitions of `name`, all of them: which one is active depends on branches.
    fn expand(&self, name: &[u8], seen: &mut Vec<Vec<u8>>, out: &mut Expansion) {
        if seen.iter().any(|s| s == name) {
            return;
        }
        seen.push(name.to_vec());
        out.visited.push(name.to_vec());
        match self.defines.get(name) {
            // Only once every file is read does "no definition" mean none (see `run`).
            None => out.builtin |= name.starts_with(b"__"),
            Some(bodies) => {
                for body in bodies {
                    match body {
                        Body::Header(op) => out.ops.push(op.clone()),
                        Body::Alias(other) => self.expand(other, seen, out),
                        Body::Other => out.complex = true,
                    }
                }
            }
        }
    }

    /// Reads one file's directives and follows them.
    fn read(&mut self, file: u32, data: &[u8]) -> Result<(), Unresolvable> {
        let found = directives(data, &self.wanted, &self.wrappers);
        let info = &mut self.files[file as usize];
        info.scanned = true;
        info.wanted_seen = self.wanted_order;
        info.wrappers_seen = self.wrappers.len();
        for (name, body) in found.defines {
            let bodies = self.defines.entry(name).or_default();
            if !bodies.contains(&body) {
                bodies.push(body);
            }
        }
        for w in found.wrappers {
            if !self.wrappers.contains(&w) {
                self.wrappers.push(w);
            }
        }
        let dir = self.files[file as usize].path.parent().map(Path::to_owned);
        for r in found.refs {
            match r.operand {
                Operand::Quoted(name) => self.lookup(dir.as_deref(), true, &name, r.how)?,
                Operand::Angle(name) => self.lookup(None, false, &name, r.how)?,
                Operand::Macro(name) => {
                    if self.pending_seen.insert((file, r.how, name.clone())) {
                        self.pending.push(Pending {
                            file,
                            how: r.how,
                            name,
                            line: r.line,
                        });
                    }
                }
                Operand::Complex(text) => {
                    if r.how == How::Probe || !self.listed {
                        return Err(self.computed_error(&Pending {
                            file,
                            how: r.how,
                            name: text,
                            line: r.line,
                        }));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every candidate for `name`: beside the includer (for `"..."`), in the `-iquote`
    /// directories (for `"..."`), and along the whole `<...>` chain. An absolute name is only
    /// itself.
    fn lookup(
        &mut self,
        includer: Option<&Path>,
        quoted: bool,
        name: &[u8],
        how: How,
    ) -> Result<(), Unresolvable> {
        if name.is_empty() {
            return Ok(());
        }
        let rel = Path::new(OsStr::from_bytes(name));
        if rel.is_absolute() {
            return self.probe(rel.to_owned(), how).map(drop);
        }
        if let Some(dir) = includer.filter(|_| quoted) {
            self.probe(dir.join(rel), how)?;
        }
        let bit = 1u8 << (u8::from(quoted) | (u8::from(how == How::Include) << 1));
        match self.looked_up.get_mut(name) {
            Some(bits) if *bits & bit != 0 => return Ok(()),
            Some(bits) => *bits |= bit,
            None => {
                self.looked_up.insert(name.to_vec(), bit);
            }
        }
        let search = self.search;
        if quoted {
            for dir in &search.quote {
                self.probe(dir.join(rel), how)?;
            }
        }
        for dir in &search.chain {
            self.probe(dir.join(rel), how)?;
        }
        Ok(())
    }

    /// Whether `spelled` (absolute) is a file, recording it; for an include, queues it for
    /// reading.
    fn probe(&mut self, spelled: PathBuf, how: How) -> Result<Option<u32>, Unresolvable> {
        let (path, prefixes) = if needs_normalizing(&spelled) {
            match resolve_dots(&spelled)? {
                Some(found) => found,
                None => return Ok(None),
            }
        } else {
            (spelled, Vec::new())
        };
        if let Some(&known) = self.by_path.get(path.as_os_str().as_bytes()) {
            if let Some(i) = known {
                let f = &mut self.files[i as usize];
                if how == How::Include && !f.scanned {
                    f.scanned = true;
                    let data = read_file(&f.path)?;
                    self.work.push((i, data));
                }
            }
            return Ok(known);
        }
        let found = if self.parent_exists(&path) {
            self.open(&path, how)?
        } else {
            None
        };
        let Some((data, stat)) = found else {
            self.by_path.insert(path.into_os_string().into_vec(), None);
            return Ok(None);
        };
        let index = self.files.len() as u32;
        let private = self.search.is_private(&path);
        if !private {
            self.dirs.extend(prefixes);
        }
        self.files.push(FileInfo {
            path: path.clone(),
            private,
            scanned: false,
            wanted_seen: 0,
            wrappers_seen: 0,
            stat,
            read: None,
        });
        self.by_path
            .insert(path.into_os_string().into_vec(), Some(index));
        if how == How::Include {
            self.files[index as usize].scanned = true;
            self.work.push((index, data));
        }
        Ok(Some(index))
    }

    /// Whether the directory of `path` exists (remembered per directory).
    fn parent_exists(&mut self, path: &Path) -> bool {
        let Some(dir) = path.parent() else {
            return true;
        };
        let key = dir.as_os_str().as_bytes();
        if let Some(&known) = self.parents.get(key) {
            return known;
        }
        // Anything but a clear "not there" is left to `open`.
        let exists = match std::fs::metadata(dir) {
            Ok(m) => m.is_dir(),
            Err(e) => !absent(&e),
        };
        self.parents.insert(key.to_vec(), exists);
        exists
    }

    /// The file at `path`, read when it is to be scanned; `None` when the compiler would not
    /// find it there.
    fn open(&self, path: &Path, how: How) -> Result<Option<Opened>, Unresolvable> {
        let opened = File::open(path).and_then(|f| f.metadata().map(|meta| (f, meta)));
        let (mut file, meta) = match opened {
            Ok(found) => found,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(unreadable(path, &e)),
        };
        // libcpp skips a directory as if it were absent.
        if !meta.is_file() {
            return Ok(None);
        }
        let mut data = Vec::new();
        let mut stat = None;
        if how == How::Include {
            // One read of the size just seen (`read_to_end` would stat again and read once
            // more to meet the end).
            data.resize(meta.len() as usize, 0);
            file.read_exact(&mut data)
                .map_err(|e| unreadable(path, &e))?;
            let before = files::Stat::of(&meta);
            stat = Some((before, files::still_for_the_slack(&before)));
        }
        Ok(Some((data, stat)))
    }

    fn closure(self, cwd: &Path) -> Closure {
        let mut read = HashMap::new();
        let files: BTreeSet<PathBuf> = self
            .files
            .into_iter()
            .filter(|f| !f.private)
            .map(|f| {
                if let Some(r) = f.read {
                    read.insert(f.path.clone(), r);
                }
                f.path
            })
            .collect();
        let mut dirs = self.dirs;
        dirs.extend(self.search.dirs.iter().cloned());
        dirs.insert(normalize(cwd));
        Closure {
            files: files.into_iter().collect(),
            read,
            dirs: dirs.into_iter().collect(),
        }
    }
}

/// rustc's FxHash: several times faster than SipHash on the short keys here (paths, names),
/// which come from this machine's files, not from an adversary.
#[derive(Debug, Default, Clone, Copy)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;
type FxSet<K> = HashSet<K, std::hash::BuildHasherDefault<Fx>>;

/// What a macro may expand to.
#[derive(Debug, Default)]
struct Expansion {
    ops: Vec<Operand>,
    /// A definition that is not a header name or a macro name.
    complex: bool,
    /// A name on the way has no definition (yet) and is reserved for the compiler, which may
    /// define it itself (`__FILE__`, `__BASE_FILE__`).
    builtin: bool,
    visited: Vec<Vec<u8>>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, Unresolvable> {
    std::fs::read(path).map_err(|e| unreadable(path, &e))
}

fn unreadable(path: &Path, e: &io::Error) -> Unresolvable {
    Unresolvable::Unreadable {
        path: path.to_owned(),
        error: e.to_string(),
    }
}

/// The errors with which the compiler moves on to the next directory. Anything else (say,
/// permission denied) stops the compile here, which a builder without the file cannot mimic.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    )
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Whether a path has `.` or `..` components, doubled or trailing slashes.
fn needs_normalizing(p: &Path) -> bool {
    let b = p.as_os_str().as_bytes();
    memchr::memchr_iter(b'/', b).any(|k| matches!(b.get(k + 1), None | Some(b'.' | b'/')))
}

/// A path without `.` components or repeated slashes (`..` kept).
fn normalize(p: &Path) -> PathBuf {
    p.components().collect()
}

/// `spelled` (absolute) with `..` resolved lexically, as the builder will resolve it, provided
/// this machine resolves it to the same place; and the directories each `..` steps out of,
/// which the builder must have for the kernel to walk through them. `None` when it does not
/// exist here (and so cannot there: the builder's files are a subset of this machine's).
///
/// For each `..`, the path up to it as spelled (`a/link/..`, which the kernel resolves
/// through the link) must be the same directory as its lexical form (`a`). If the spelled one
/// does not exist, the directory before the `..` is missing or not a directory here, and the
/// builder will not have it either. If the lexical one is missing or another directory, the
/// builder would look elsewhere than this machine does.
fn resolve_dots(spelled: &Path) -> Result<Option<(PathBuf, Vec<PathBuf>)>, Unresolvable> {
    let mut walked = PathBuf::from("/");
    let mut lexical = PathBuf::from("/");
    let mut prefixes = Vec::new();
    let mut after_name = false;
    for c in spelled.components() {
        match c {
            Component::Normal(part) => {
                walked.push(part);
                lexical.push(part);
                after_name = true;
            }
            Component::ParentDir => {
                if after_name {
                    // `a/b/../..` needs `a/b`; `a` follows from it.
                    prefixes.push(lexical.clone());
                }
                after_name = false;
                walked.push("..");
                lexical.pop();
                let here = std::fs::metadata(&walked);
                let there = std::fs::metadata(&lexical);
                match (here, there) {
                    (Err(_), _) => return Ok(None),
                    (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => {}
                    _ => return Err(Unresolvable::SymlinkDotDot(spelled.to_owned())),
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(Some((lexical, prefixes)))
}

// ---------------------------------------------------------------------------------------------
// Reading directives.

/// Calls `directive` with the offset of each directive's `#` and its logical line after the
/// `#` (continuations joined, comments replaced by a space). Comments and string, character and
/// raw string literals are skipped so that a `#` or `/*` inside them means nothing, as in the
/// compiler. Where it must guess, it guesses towards seeing more: a missed directive breaks a
/// remote compile, an extra one costs a file.
///
/// Speed: it jumps with `memchr` from one `#` or possible comment or literal start to the
/// next, so text between them costs what the vectorized search costs; whether a `#` starts its
/// line is decided by looking back over blanks.
fn lex(data: &[u8], mut directive: impl FnMut(usize, &[u8]) -> ControlFlow<()>) {
    let n = data.len();
    let mut line = Vec::with_capacity(256);
    let mut i = 0;
    let mut next_hash = memchr(b'#', data).unwrap_or(n);
    let mut next_special = memchr3(b'/', b'"', b'\'', data).unwrap_or(n);
    // The end of the last block comment that began at the start of its line: a `#` right after
    // it (`/* note */ #include "x.h"`) still starts a directive.
    let mut leading_comment_end = usize::MAX;
    loop {
        if next_hash < i {
            next_hash = memchr(b'#', &data[i..]).map_or(n, |k| i + k);
        }
        if next_special < i {
            next_special = memchr3(b'/', b'"', b'\'', &data[i..]).map_or(n, |k| i + k);
        }
        if next_hash < next_special {
            let at = next_hash;
            i = if starts_line(data, at, leading_comment_end) {
                let end = logical_line(data, at + 1, &mut line);
                if directive(at, &line).is_break() {
                    return;
                }
                end
            } else {
                at + 1
            };
            continue;
        }
        let at = next_special;
        if at >= n {
            return;
        }
        i = match (data[at], data.get(at + 1)) {
            (b'/', Some(b'*')) => {
                let end = block_comment_end(data, at + 2);
                if starts_line(data, at, leading_comment_end) {
                    leading_comment_end = end;
                }
                end
            }
            (b'/', Some(b'/')) => line_comment_end(data, at + 2),
            (b'"', _) => string_end(data, at),
            (b'\'', _) => char_end(data, at),
            _ => at + 1,
        };
    }
}

/// Whether only blanks (or a block comment that itself starts the line) precede `at` on its
/// line. A line joined to the one before by a backslash counts as a start: a directive too many
/// costs at most a file.
fn starts_line(data: &[u8], at: usize, leading_comment_end: usize) -> bool {
    let mut j = at;
    while j > 0 && matches!(data[j - 1], b' ' | b'\t' | b'\r' | 0x0b | 0x0c) {
        j -= 1;
    }
    j == 0 || data[j - 1] == b'\n' || j == leading_comment_end
}

/// The length of a line splice at `i` (a backslash, optional spaces as gcc allows with a
/// warning, and a line end), or 0.
fn splice_len(data: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < data.len() && matches!(data[j], b' ' | b'\t' | b'\r') {
        j += 1;
    }
    if data.get(j) == Some(&b'\n') {
        j + 1 - i
    } else {
        0
    }
}

/// Whether the line end at `nl` is spliced away by a backslash before it.
fn spliced(data: &[u8], nl: usize) -> bool {
    let mut j = nl;
    while j > 0 && matches!(data[j - 1], b' ' | b'\t' | b'\r') {
        j -= 1;
    }
    j > 0 && data[j - 1] == b'\\'
}

fn block_comment_end(data: &[u8], from: usize) -> usize {
    memchr::memchr_iter(b'/', &data[from..])
        .map(|k| from + k)
        .find(|&k| k > from && data[k - 1] == b'*')
        .map_or(data.len(), |k| k + 1)
}

/// The line end that ends a `//` comment (not consumed); a spliced line end continues it.
fn line_comment_end(data: &[u8], mut from: usize) -> usize {
    loop {
        match memchr(b'\n', &data[from..]) {
            None => return data.len(),
            Some(k) if spliced(data, from + k) => from += k + 1,
            Some(k) => return from + k,
        }
    }
}

/// The end of a string literal starting at the `"` at `i`. An unterminated one ends with its
/// line, as the compiler's error would.
fn string_end(data: &[u8], i: usize) -> usize {
    if let Some(end) = raw_string_end(data, i) {
        return end;
    }
    let mut j = i + 1;
    while let Some(k) = memchr3(b'\\', b'"', b'\n', &data[j..]) {
        let at = j + k;
        match data[at] {
            // An escape, or a spliced line end inside the literal.
            b'\\' => j = (at + splice_len(data, at).max(2)).min(data.len()),
            b'"' => return at + 1,
            _ => return at,
        }
    }
    data.len()
}

/// The end of a raw string (`R"delim(...)delim"`, with an encoding prefix) whose `"` is at `i`.
fn raw_string_end(data: &[u8], i: usize) -> Option<usize> {
    if i == 0 || data[i - 1] != b'R' {
        return None;
    }
    let mut s = i - 1;
    while s > 0 && is_ident(data[s - 1]) {
        s -= 1;
    }
    if !matches!(&data[s..i], b"R" | b"LR" | b"uR" | b"UR" | b"u8R") {
        return None;
    }
    let open = i + 1 + data[i + 1..].iter().take(17).position(|&c| c == b'(')?;
    let delim = &data[i + 1..open];
    if delim
        .iter()
        .any(|&c| matches!(c, b' ' | b')' | b'\\' | b'\t' | b'\n' | b'"'))
    {
        return None;
    }
    let mut close = Vec::with_capacity(delim.len() + 2);
    close.push(b')');
    close.extend_from_slice(delim);
    close.push(b'"');
    Some(memmem::find(&data[open + 1..], &close).map_or(data.len(), |k| open + 1 + k + close.len()))
}

/// The end of a character literal at the `'` at `i`, or just past it when it is a C++14 digit
/// separator (`1'000`).
fn char_end(data: &[u8], i: usize) -> usize {
    if i > 0 && is_ident(data[i - 1]) {
        let mut s = i - 1;
        while s > 0 && (is_ident(data[s - 1]) || matches!(data[s - 1], b'\'' | b'.')) {
            s -= 1;
        }
        if data[s].is_ascii_digit() {
            return i + 1;
        }
    }
    let mut j = i + 1;
    while j < data.len() {
        match data[j] {
            b'\\' => j += 2,
            b'\'' => return j + 1,
            b'\n' => return j,
            _ => j += 1,
        }
    }
    data.len()
}

/// Copies the logical line that starts at `from` (just after a `#`) into `line`, and returns
/// where the next line starts. A block comment is one space, even over several lines (the
/// directive goes on after it, as in translation phase 3).
fn logical_line(data: &[u8], mut i: usize, line: &mut Vec<u8>) -> usize {
    line.clear();
    let n = data.len();
    loop {
        // Plain bytes go over in bulk; both searches stop at the line end.
        let stop = memchr3(b'\n', b'\\', b'/', &data[i..]).map_or(n, |k| i + k);
        let stop = memchr3(b'"', b'\'', b'<', &data[i..stop]).map_or(stop, |k| i + k);
        line.extend_from_slice(&data[i..stop]);
        i = stop;
        if i >= n {
            return n;
        }
        let b = data[i];
        match b {
            b'\n' => return i + 1,
            b'\\' if splice_len(data, i) > 0 => i += splice_len(data, i),
            b'/' if data.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(data, i + 2);
                line.push(b' ');
            }
            b'/' if data.get(i + 1) == Some(&b'/') => i = line_comment_end(data, i + 2),
            b'"' | b'\'' => {
                let end = if b == b'"' {
                    string_end(data, i)
                } else {
                    char_end(data, i)
                };
                line.extend_from_slice(&data[i..end]);
                i = end;
            }
            // A header name: `//` or `'` inside `<...>` is part of it (libcpp lexes it whole
            // after `#include` and in `__has_include(`).
            b'<' if header_name_may_follow(line) => {
                let end = data[i..]
                    .iter()
                    .position(|&c| c == b'>' || c == b'\n')
                    .map_or(n, |k| i + k);
                let end = if data.get(end) == Some(&b'>') {
                    end + 1
                } else {
                    end
                };
                line.extend_from_slice(&data[i..end]);
                i = end;
            }
            _ => {
                line.push(b);
                i += 1;
            }
        }
    }
}

fn header_name_may_follow(line: &[u8]) -> bool {
    let t = trim(line);
    [&b"include"[..], b"include_next", b"import", b"embed", b"("]
        .iter()
        .any(|w| t.ends_with(w))
}

/// The references, wanted definitions and wrappers in one file.
fn directives(data: &[u8], wanted: &FxSet<Vec<u8>>, wrappers: &[Wrapper]) -> Found {
    let mut found = Found::default();
    lex(data, |at, line| {
        let line_no = || memchr::memchr_iter(b'\n', &data[..at]).count() as u32 + 1;
        let (name, rest) = split_ident(trim(line));
        match name {
            b"include" | b"include_next" | b"import" | b"embed" => {
                let how = if name == b"embed" {
                    How::Probe
                } else {
                    How::Include
                };
                if let Some(operand) = include_operand(rest) {
                    let line = match operand {
                        Operand::Macro(_) | Operand::Complex(_) => line_no(),
                        _ => 0,
                    };
                    found.refs.push(Ref { how, operand, line });
                }
            }
            b"if" | b"elif" if mentions_probe(rest, wrappers) => {
                for (operand, _) in probes(rest, &[], wrappers) {
                    let line = line_no();
                    found.refs.push(Ref {
                        how: How::Probe,
                        operand,
                        line,
                    });
                }
            }
            b"define" => define(rest, wanted, wrappers, &mut found, line_no),
            _ => {}
        }
        ControlFlow::Continue(())
    });
    found
}

/// The header name of a source's first `#include`, when it is written literally: gcc looks
/// for a precompiled `name.gch` before it (see `compile::c_family`). The lexing stops there.
pub fn first_include(data: &[u8]) -> Option<String> {
    let mut found = None;
    lex(data, |_, line| {
        let (name, rest) = split_ident(trim(line));
        if name != b"include" {
            return ControlFlow::Continue(());
        }
        found = match include_operand(rest) {
            Some(Operand::Quoted(n) | Operand::Angle(n)) => String::from_utf8(n).ok(),
            _ => None,
        };
        ControlFlow::Break(())
    });
    found
}

/// A file name tested by `__has_include` (or `__has_embed`, or embedded by `#embed`), as
/// written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub name: String,
    /// `"name"` (searched from the including file's directory first) rather than `<name>`.
    pub quoted: bool,
}

/// The names a file tests with `__has_include` and kin, read by the same directive reader as
/// the farm's scan, for the cache's manifest. `Err` names the first test whose operand is not
/// a literal (a macro, or a macro of the file's own that wraps `__has_include`), which the
/// manifest cannot follow. Mentions that are not calls, such as `#ifdef __has_include`, and
/// those in comments are not probes.
pub fn include_probes(data: &[u8]) -> Result<Vec<Probe>, String> {
    let found = directives(data, &FxSet::default(), &[]);
    if let Some(w) = found.wrappers.first() {
        return Err(format!(
            "the macro {}, which wraps `__has_include`",
            String::from_utf8_lossy(&w.name)
        ));
    }
    let mut out = Vec::new();
    for r in found.refs.iter().filter(|r| r.how == How::Probe) {
        let (name, quoted) = match &r.operand {
            Operand::Quoted(n) => (n, true),
            Operand::Angle(n) => (n, false),
            Operand::Macro(t) | Operand::Complex(t) => {
                return Err(format!(
                    "`__has_include({})` on line {}",
                    String::from_utf8_lossy(t),
                    r.line
                ))
            }
        };
        let name = String::from_utf8(name.clone()).map_err(|_| {
            format!(
                "a `__has_include` of a name that is not UTF-8 on line {}",
                r.line
            )
        })?;
        out.push(Probe { name, quoted });
    }
    Ok(out)
}

/// Whether `text` may hold a probe: most directives do not, and this look is cheaper than the
/// parse.
fn mentions_probe(text: &[u8], wrappers: &[Wrapper]) -> bool {
    static HAS: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(b"__has_"));
    HAS.find(text).is_some()
        || wrappers
            .iter()
            .any(|w| memmem::find(text, &w.name).is_some())
}

/// `#define NAME body` or `#define NAME(params) body`.
fn define(
    text: &[u8],
    wanted: &FxSet<Vec<u8>>,
    wrappers: &[Wrapper],
    found: &mut Found,
    line_no: impl Fn() -> u32,
) {
    let (name, rest) = split_ident(trim(text));
    // `#ifndef __has_include / #define __has_include(x) 0` is a shim for other compilers.
    if name.is_empty() || name.starts_with(b"__has_include") || name == b"__has_embed" {
        return;
    }
    let mentions_probe = |body: &[u8]| mentions_probe(body, wrappers);
    if rest.first() == Some(&b'(') {
        let Some(close) = memchr(b')', rest) else {
            return;
        };
        let params: Vec<&[u8]> = rest[1..close].split(|&c| c == b',').map(trim).collect();
        let body = &rest[close + 1..];
        if !mentions_probe(body) {
            return;
        }
        for (operand, param) in probes(body, &params, wrappers) {
            match param {
                Some(param) => found.wrappers.push(Wrapper {
                    name: name.to_vec(),
                    param,
                }),
                None => found.refs.push(Ref {
                    how: How::Probe,
                    operand,
                    line: line_no(),
                }),
            }
        }
        return;
    }
    let body = trim(rest);
    if mentions_probe(body) {
        for (operand, _) in probes(body, &[], wrappers) {
            found.refs.push(Ref {
                how: How::Probe,
                operand,
                line: line_no(),
            });
        }
    }
    if !wanted.is_empty() && wanted.contains(name) {
        found.defines.push((name.to_vec(), Body::of(body)));
    }
}

/// The operands of `__has_include`, `__has_include_next`, `__has_embed` and wrapper calls in
/// `text`. Inside a function-like macro, an operand that is one of its `params` makes the macro
/// a wrapper: the index of that parameter comes back instead of a probe.
fn probes(text: &[u8], params: &[&[u8]], wrappers: &[Wrapper]) -> Vec<(Operand, Option<usize>)> {
    let mut out = Vec::new();
    let mut note = |arg: &[u8]| {
        let operand = classify(arg);
        match &operand {
            Operand::Macro(m) => {
                if let Some(p) = params.iter().position(|p| p == m) {
                    out.push((operand, Some(p)));
                    return;
                }
            }
            // A parameter inside `<...>` is replaced: the name is not what is written.
            Operand::Angle(inner) if !params.is_empty() => {
                let replaced = inner
                    .split(|c| !is_ident(*c))
                    .any(|word| params.contains(&word));
                if replaced {
                    out.push((Operand::Complex(arg.to_vec()), None));
                    return;
                }
            }
            _ => {}
        }
        out.push((operand, None));
    };
    for builtin in [&b"__has_include"[..], b"__has_embed"] {
        for args in calls(text, builtin) {
            note(args.first().copied().unwrap_or(b""));
        }
    }
    for w in wrappers {
        for args in calls(text, &w.name) {
            note(args.get(w.param).copied().unwrap_or(b""));
        }
    }
    out
}

/// The calls of `name` (or `name_next`, for the builtins) in `text`: the arguments of each,
/// split at top-level commas and trimmed. A mention that is not a call (`#ifdef __has_include`,
/// `defined(__has_include)`) is none.
fn calls<'t>(text: &'t [u8], name: &[u8]) -> Vec<Vec<&'t [u8]>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = memmem::find(&text[from..], name) {
        let start = from + k;
        let mut i = start + name.len();
        from = i;
        if start > 0 && is_ident(text[start - 1]) {
            continue;
        }
        if name.starts_with(b"__has_") && text[i..].starts_with(b"_next") {
            i += b"_next".len();
        }
        if text.get(i).is_some_and(|&c| is_ident(c)) {
            continue;
        }
        while text.get(i).is_some_and(|&c| c == b' ' || c == b'\t') {
            i += 1;
        }
        if text.get(i) != Some(&b'(') {
            continue;
        }
        let mut args = Vec::new();
        let mut depth = 0usize;
        let mut arg_start = i + 1;
        let mut j = i + 1;
        let mut closed = false;
        while j < text.len() {
            match text[j] {
                b'(' => depth += 1,
                b')' if depth == 0 => {
                    args.push(trim(&text[arg_start..j]));
                    closed = true;
                    break;
                }
                b')' => depth -= 1,
                b',' if depth == 0 => {
                    args.push(trim(&text[arg_start..j]));
                    arg_start = j + 1;
                }
                b'"' => j = string_end(text, j) - 1,
                b'<' => {
                    // A header name may hold anything but `>`.
                    if let Some(k) = memchr(b'>', &text[j..]) {
                        j += k;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        if !closed {
            // An unclosed call: the rest is its operand, which `classify` will not take.
            out.push(vec![trim(&text[i + 1..])]);
            break;
        }
        from = j;
        out.push(args);
    }
    out
}

/// The operand of `#include`: `None` when there is none to follow (empty, unterminated).
fn include_operand(rest: &[u8]) -> Option<Operand> {
    let t = trim(rest);
    match t.first()? {
        b'"' => {
            let end = memchr(b'"', &t[1..])?;
            Some(Operand::Quoted(t[1..1 + end].to_vec()))
        }
        b'<' => {
            let end = memchr(b'>', &t[1..])?;
            Some(Operand::Angle(t[1..1 + end].to_vec()))
        }
        _ => Some(classify(t)),
    }
}

/// A whole operand: `"x"`, `<x>`, one identifier, or something else.
fn classify(t: &[u8]) -> Operand {
    let t = trim(t);
    match t.first() {
        Some(b'"') if t.len() >= 2 && memchr(b'"', &t[1..]) == Some(t.len() - 2) => {
            Operand::Quoted(t[1..t.len() - 1].to_vec())
        }
        Some(b'<') if t.len() >= 2 && t.ends_with(b">") => {
            Operand::Angle(collapse_spaces(&t[1..t.len() - 1]))
        }
        Some(c) if is_ident(*c) && !c.is_ascii_digit() && t.iter().all(|&c| is_ident(c)) => {
            Operand::Macro(t.to_vec())
        }
        _ => Operand::Complex(t.to_vec()),
    }
}

/// A `<...>` name from a macro is its tokens' spellings with each run of whitespace made one
/// space (libcpp's rule).
fn collapse_spaces(t: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.len());
    for &c in t {
        let space = c == b' ' || c == b'\t';
        if !(space && out.last() == Some(&b' ')) {
            out.push(if space { b' ' } else { c });
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn trim(t: &[u8]) -> &[u8] {
    let is_space = |c: &u8| matches!(c, b' ' | b'\t' | b'\r' | 0x0b | 0x0c);
    let start = t.iter().position(|c| !is_space(c)).unwrap_or(t.len());
    let end = t
        .iter()
        .rposition(|c| !is_space(c))
        .map_or(start, |k| k + 1);
    &t[start..end]
}

/// The identifier at the start of `t` and what follows it.
fn split_ident(t: &[u8]) -> (&[u8], &[u8]) {
    let end = t.iter().position(|&c| !is_ident(c)).unwrap_or(t.len());
    (&t[..end], &t[end..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args;
    use crate::compiler::Identity;
    use crate::env::Env;
    use crate::search_path::is_toolchain_dir;
    use crate::testing::identity;
    use std::fs;
    use std::time::{Duration, Instant};

    /// A scratch project: the compile's working directory is its root.
    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            let root = fs::canonicalize(dir.path()).unwrap();
            Tree { _dir: dir, root }
        }

        fn file(&self, rel: &str, text: &str) -> PathBuf {
            let path = self.root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
            path
        }

        fn dir(&self, rel: &str) -> PathBuf {
            let path = self.root.join(rel);
            fs::create_dir_all(&path).unwrap();
            path
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        /// Scans `args` (a compile command) with no compiler directories.
        fn scan(&self, args: &[&str]) -> Result<Closure, Unresolvable> {
            self.scan_in(args, &Env::default())
        }

        /// Scans `args` with no compiler directories in the environment `env`.
        fn scan_in(&self, args: &[&str], env: &Env) -> Result<Closure, Unresolvable> {
            let c = compile(args);
            scan(
                &c,
                &SearchPath::of(&c, &identity(&[], &[]), env),
                &self.root,
            )
        }

        /// The shipped files, relative to the root (others absolute).
        fn shipped(&self, c: &Closure) -> Vec<String> {
            c.files
                .iter()
                .map(|f| {
                    f.strip_prefix(&self.root)
                        .map_or_else(|_| f.display().to_string(), |r| r.display().to_string())
                })
                .collect()
        }
    }

    /// Scans `c` along the search path `id` gives it, with no environment.
    fn scan_as(c: &Compile, id: &Identity, cwd: &Path) -> Result<Closure, Unresolvable> {
        scan(c, &SearchPath::of(c, id, &Env::default()), cwd)
    }

    fn compile(args: &[&str]) -> Compile {
        args::classify(args.iter().map(|s| s.to_string()).collect()).expect("a cacheable compile")
    }

    #[test]
    fn quoted_and_angle_names_search_their_own_directories() {
        let t = Tree::new();
        t.file("src/main.c", "#include \"q.h\"\n#include <a.h>\n");
        for dir in ["src", "iq", "inc"] {
            t.file(&format!("{dir}/q.h"), "");
            t.file(&format!("{dir}/a.h"), "");
        }
        let c = t
            .scan(&["-c", "src/main.c", "-iquote", "iq", "-I", "inc"])
            .unwrap();
        // "q.h": beside the includer, -iquote, -I; <a.h>: -I only.
        assert_eq!(
            t.shipped(&c),
            ["inc/a.h", "inc/q.h", "iq/q.h", "src/main.c", "src/q.h"]
        );
        assert_eq!(c.dirs, [t.root.clone(), t.path("inc"), t.path("iq")]);
    }

    #[test]
    fn include_next_and_its_probe_are_followed() {
        let t = Tree::new();
        t.file("main.c", "#include <n.h>\n");
        t.file(
            "inc1/n.h",
            "#  include_next <n2.h>\n#if __has_include_next(<p.h>)\n#endif\n",
        );
        t.file("inc2/n2.h", "#include \"deep.h\"\n");
        t.file("inc2/deep.h", "");
        t.file("inc2/p.h", "");
        let c = t
            .scan(&["-c", "main.c", "-I", "inc1", "-I", "inc2"])
            .unwrap();
        assert_eq!(
            t.shipped(&c),
            ["inc1/n.h", "inc2/deep.h", "inc2/n2.h", "inc2/p.h", "main.c"]
        );
    }

    #[test]
    fn forced_includes_search_the_working_directory_first() {
        let t = Tree::new();
        t.file("src/main.c", "int x;\n");
        t.file("f.h", "#include \"f2.h\"\n");
        t.file("f2.h", "");
        t.file("inc/m.h", "#define M 1\n");
        t.file("g.h", "");
        t.file("inc/g.h", "");
        let c = t
            .scan(&[
                "-c",
                "src/main.c",
                "-include",
                "f.h",
                "-imacros",
                "m.h",
                "-includeg.h",
                "-I",
                "inc",
            ])
            .unwrap();
        assert_eq!(
            t.shipped(&c),
            ["f.h", "f2.h", "g.h", "inc/g.h", "inc/m.h", "src/main.c"]
        );
    }

    #[test]
    fn every_branch_counts() {
        let t = Tree::new();
        t.file(
            "main.c",
            "#if 0\n#include \"dead.h\"\n#else\n#include \"live.h\"\n#endif\n\
             #ifdef NEVER\n# include <never.h>\n#endif\n",
        );
        t.file("dead.h", "");
        t.file("live.h", "");
        t.file("inc/never.h", "");
        let c = t.scan(&["-c", "main.c", "-I", "inc"]).unwrap();
        assert_eq!(t.shipped(&c), ["dead.h", "inc/never.h", "live.h", "main.c"]);
    }

    #[test]
    fn computed_includes_that_cannot_be_expanded_are_unresolvable() {
        let t = Tree::new();
        // The compiler defines __FILE__ itself: a file that includes itself.
        t.file("main.c", "int a;\n\n#include __FILE__\n");
        assert_eq!(
            t.scan(&["-c", "main.c"]),
            Err(Unresolvable::Computed {
                file: t.path("main.c"),
                line: 3,
                name: "__FILE__".into()
            })
        );
        t.file(
            "call.c",
            "#define STR(x) #x\n#define XSTR(x) STR(x)\n#include XSTR(stdio.h)\n",
        );
        assert!(matches!(
            t.scan(&["-c", "call.c"]),
            Err(Unresolvable::Computed { line: 3, .. })
        ));
        // A macro with one usable definition and one that is not a header name.
        t.file(
            "mixed.c",
            "#define H \"x.h\"\n#undef H\n#define H PICK(1)\n#include H\n",
        );
        t.file("x.h", "");
        assert!(matches!(
            t.scan(&["-c", "mixed.c"]),
            Err(Unresolvable::Computed { line: 4, .. })
        ));
        t.file(
            "probe.c",
            "#define WHICH PICK(<a.h>)\n#if __has_include(WHICH)\n#endif\n",
        );
        assert_eq!(
            t.scan(&["-c", "probe.c"]),
            Err(Unresolvable::ComputedProbe {
                file: t.path("probe.c"),
                line: 2,
                name: "WHICH".into()
            })
        );
        t.file("embed.c", "#embed DATA\n#define DATA __DATE__\n");
        assert!(matches!(
            t.scan(&["-c", "embed.c"]),
            Err(Unresolvable::ComputedProbe { line: 1, .. })
        ));
    }

    #[test]
    fn computed_includes_expand_from_every_definition() {
        let t = Tree::new();
        // CFG is defined in a header read before the include, ALIAS's target only in a header
        // found later, OTHER on the command line.
        // USER_CONFIG is defined nowhere: that include is dead or fails everywhere alike.
        t.file(
            "main.c",
            "#include \"def.h\"\n#include CFG\n#include OTHER\n#include ALIAS\n#include \"late.h\"\n\
             #ifdef USER_CONFIG\n#include USER_CONFIG\n#endif\n",
        );
        t.file(
            "def.h",
            "#ifdef A\n#define CFG \"cfg_a.h\"\n#else\n#define CFG <cfg_b.h>\n#endif\n",
        );
        t.file(
            "late.h",
            "#define ALIAS TARGET\n#define TARGET < cfg2.h >\n",
        );
        t.file("cfg_a.h", "");
        t.file("inc/cfg_b.h", "#include \"nested.h\"\n");
        t.file("inc/nested.h", "");
        t.file("inc/other.h", "");
        t.file("inc/ cfg2.h ", "");
        let c = t
            .scan(&["-c", "main.c", "-I", "inc", "-DOTHER=<other.h>"])
            .unwrap();
        assert_eq!(
            t.shipped(&c),
            [
                "cfg_a.h",
                "def.h",
                "inc/ cfg2.h ",
                "inc/cfg_b.h",
                "inc/nested.h",
                "inc/other.h",
                "late.h",
                "main.c"
            ]
        );
    }

    #[test]
    fn parent_directory_includes_are_spelled_without_dots() {
        let t = Tree::new();
        t.file("src/sub/a.c", "#include \"../common.h\"\n#include <x.h>\n");
        t.file("src/common.h", "#include \"./../top.h\"\n");
        t.file("top.h", "");
        t.file("src/inc/x.h", "");
        let c = t
            .scan(&["-c", "src/sub/a.c", "-I", "src/sub/../inc"])
            .unwrap();
        assert_eq!(
            t.shipped(&c),
            ["src/common.h", "src/inc/x.h", "src/sub/a.c", "top.h"]
        );
        assert!(c.files.iter().all(|f| !f.to_string_lossy().contains("..")));
        // The kernel walks through the directory before each `..`, so the jail needs it.
        assert!(c.dirs.contains(&t.path("src/sub")), "{:?}", c.dirs);
        assert!(c.dirs.contains(&t.path("src/inc")), "{:?}", c.dirs);
    }

    #[test]
    fn dotdot_through_a_symlink_is_unresolvable() {
        let t = Tree::new();
        t.file("real/inc/x.h", "#include \"../up.h\"\n");
        t.file("real/up.h", "");
        std::os::unix::fs::symlink(t.path("real/inc"), t.path("link")).unwrap();
        t.file("main.c", "#include <x.h>\n");
        // Here `link/../up.h` is real/up.h; in the jail, where `link` is a plain directory, it
        // would be ./up.h.
        assert_eq!(
            t.scan(&["-c", "main.c", "-I", "link"]),
            Err(Unresolvable::SymlinkDotDot(t.path("link/../up.h")))
        );
        // Through the real directory, the same header is fine.
        let c = t.scan(&["-c", "main.c", "-I", "real/inc"]).unwrap();
        assert_eq!(t.shipped(&c), ["main.c", "real/inc/x.h", "real/up.h"]);
    }

    #[test]
    fn nonexistent_include_directories_are_skipped_not_created() {
        let t = Tree::new();
        t.file("main.c", "#include <a.h>\n#include \"../b.h\"\n");
        t.file("inc/sub/a.h", "");
        // Reachable only as nope/../b.h: gcc drops `nope`, so must the scan and the jail.
        t.file("b.h", "");
        t.file("not_a_dir", "");
        let c = t
            .scan(&[
                "-c",
                "main.c",
                "-I",
                "nope",
                "-I",
                "inc/sub",
                "-iquote",
                "gone",
                "-isystem",
                "not_a_dir",
                "-idirafter",
                "nope/..",
            ])
            .unwrap();
        assert_eq!(t.shipped(&c), ["inc/sub/a.h", "main.c"]);
        assert_eq!(c.dirs, [t.root.clone(), t.path("inc/sub")]);
    }

    #[test]
    fn include_cycles_terminate() {
        let t = Tree::new();
        t.file("main.c", "#include \"a.h\"\n");
        t.file("a.h", "#include \"a.h\"\n#include \"b.h\"\n");
        t.file("b.h", "#include \"a.h\"\n#include \"./b.h\"\n");
        let c = t.scan(&["-c", "main.c"]).unwrap();
        assert_eq!(t.shipped(&c), ["a.h", "b.h", "main.c"]);
    }

    #[test]
    fn comments_and_literals_hide_directives_as_in_the_compiler() {
        let t = Tree::new();
        let source = r#"// #include "line_comment.h"
/* #include "block_comment.h"
#include "block_comment2.h" */
#/* gap */include "after_comment.h"
# \
include "continued.h"
const char *s = "/*";
#include "after_string.h"
char c = '"'; // "
#include "after_char.h"
const char *r = R"x(
#include "in_raw.h"
)x";
int n = 1'000'000; /* x */ #include "not_at_line_start.h"
  /* lead */ #include "lead_comment.h"
// a comment continued \
#include "in_continued_comment.h"
#include <angle//slashes.h>
#define Q "/*"
#include "after_define.h"
"#;
        t.file("main.cpp", source);
        for name in [
            "line_comment.h",
            "block_comment.h",
            "block_comment2.h",
            "after_comment.h",
            "continued.h",
            "after_string.h",
            "after_char.h",
            "in_raw.h",
            "not_at_line_start.h",
            "lead_comment.h",
            "in_continued_comment.h",
            "after_define.h",
        ] {
            t.file(name, "");
        }
        t.file("inc/angle/slashes.h", "");
        let c = t.scan(&["-c", "main.cpp", "-I", "inc"]).unwrap();
        assert_eq!(
            t.shipped(&c),
            [
                "after_char.h",
                "after_comment.h",
                "after_define.h",
                "after_string.h",
                "continued.h",
                "inc/angle/slashes.h",
                "lead_comment.h",
                "main.cpp"
            ]
        );
    }

    #[test]
    fn probed_files_are_shipped_but_not_followed() {
        let t = Tree::new();
        t.file(
            "main.c",
            "#if defined(__has_include) && __has_include(\"probe.h\")\n#endif\n\
             #ifndef __has_include\n#define __has_include(x) 0\n#endif\n\
             #include \"port.h\"\n#if HAS(<wrapped.h>) || __has_include(<absent.h>)\n#endif\n\
             #define FOUND __has_include(<in_define.h>)\n",
        );
        t.file("probe.h", "#include \"from_probe.h\"\n");
        t.file("from_probe.h", "");
        // The wrapper is defined in a header read after its use was seen.
        t.file("port.h", "#define HAS(x) __has_include(x)\n");
        t.file("inc/wrapped.h", "");
        t.file("inc/in_define.h", "");
        let c = t.scan(&["-c", "main.c", "-I", "inc"]).unwrap();
        assert_eq!(
            t.shipped(&c),
            [
                "inc/in_define.h",
                "inc/wrapped.h",
                "main.c",
                "port.h",
                "probe.h"
            ]
        );
    }

    #[test]
    fn the_rule_for_toolchain_directories() {
        for dir in [
            "/usr/lib/gcc/x86_64-linux-gnu/12/include",
            "/usr/lib/gcc/x86_64-linux-gnu/12/include-fixed",
            "/usr/lib/gcc-cross/aarch64-linux-gnu/12/include",
            "/opt/gcc-13/lib/gcc/x86_64-pc-linux-gnu/13/include",
            "/usr/lib/llvm-14/lib/clang/14.0.6/include",
            "/usr/lib64/clang/17/include",
        ] {
            assert!(is_toolchain_dir(Path::new(dir)), "{dir}");
        }
        for dir in [
            "/usr/include",
            "/usr/include/c++/12",
            "/usr/include/x86_64-linux-gnu/c++/12",
            "/usr/include/c++/12/backward",
            "/usr/local/include",
            "/usr/aarch64-linux-gnu/include",
            "/usr/lib/llvm-14/include/c++/v1",
            "/opt/gcc-13/include/c++/13",
        ] {
            assert!(!is_toolchain_dir(Path::new(dir)), "{dir}");
        }
    }

    #[test]
    fn toolchain_headers_are_read_but_not_shipped() {
        let t = Tree::new();
        let own = "tc/lib/gcc/x86_64-linux-gnu/12/include";
        t.file(&format!("{own}/stdint.h"), "#include_next <stdint.h>\n");
        t.file(&format!("{own}/mm_malloc.h"), "#include <stdlib.h>\n");
        t.file("sys/include/stdint.h", "");
        t.file("sys/include/stdlib.h", "");
        t.file("main.c", "#include <stdint.h>\n#include <mm_malloc.h>\n");
        let own_dir = t.path(own);
        let sys_dir = t.path("sys/include");
        let id = identity(&[own_dir.to_str().unwrap(), sys_dir.to_str().unwrap()], &[]);
        let c = scan_as(&compile(&["-c", "main.c"]), &id, &t.root).unwrap();
        assert_eq!(
            t.shipped(&c),
            ["main.c", "sys/include/stdint.h", "sys/include/stdlib.h"]
        );
        assert_eq!(c.dirs, [t.root.clone(), sys_dir]);
        // -nostdinc: none of the compiler's directories is searched.
        let c = scan_as(&compile(&["-c", "main.c", "-nostdinc"]), &id, &t.root).unwrap();
        assert_eq!(t.shipped(&c), ["main.c"]);
    }

    #[test]
    fn options_that_move_the_compilers_directories_are_unresolvable() {
        let t = Tree::new();
        t.file("main.c", "");
        let id = identity(&[], &[]);
        for extra in [
            &["--sysroot=/x"][..],
            &["--sysroot", "/x"],
            &["-isysroot", "/x"],
            &["-iprefix", "/x/"],
            &["-iwithprefix", "y"],
            &["-stdlib=libc++"],
            &["-m32"],
        ] {
            let mut args = vec!["-c", "main.c"];
            args.extend(extra);
            let c = compile(&args);
            assert!(
                matches!(scan_as(&c, &id, &t.root), Err(Unresolvable::Option(_))),
                "{extra:?}"
            );
        }
        assert!(scan_as(&compile(&["-c", "main.c", "-O2", "-DX=1"]), &id, &t.root).is_ok());
    }

    #[test]
    fn environment_include_paths_are_searched() {
        let t = Tree::new();
        t.file(
            "main.c",
            "#include <e.h>\n#include <s.h>\n#include <p.h>\n#include <h.h>\n",
        );
        t.file("envinc/e.h", "");
        t.file("sys/s.h", "");
        t.file("cxx/p.h", "");
        t.file("h.h", "");
        let env = crate::env::Env::from_pairs([
            ("CPATH", "envinc:"),
            ("C_INCLUDE_PATH", "sys"),
            ("CPLUS_INCLUDE_PATH", "cxx"),
        ]);
        let c = t.scan_in(&["-c", "main.c"], &env).unwrap();
        assert_eq!(t.shipped(&c), ["envinc/e.h", "h.h", "main.c", "sys/s.h"]);
    }

    #[test]
    fn the_first_include_is_read_by_the_same_lexer() {
        let src = b"/* #include \"no.h\" */\n// #include <no.h>\n#include_next <no.h>\n  #  include \"pch.h\"\n#include <b.h>\n";
        assert_eq!(first_include(src).as_deref(), Some("pch.h"));
        assert_eq!(first_include(b"#include HDR\n#include <b.h>\n"), None);
        assert_eq!(first_include(b"int x;\n"), None);
    }

    #[test]
    fn include_probes_for_the_manifest_are_read_by_the_same_reader() {
        let text = b"#ifdef __has_include\n#if __has_include(\"port/cfg.h\") && __has_include_next( <x/y.h> )\n#endif\n#endif\n#if defined(__has_include)\n// __has_include(<in/a/comment.h>)\n";
        let probes = include_probes(text).unwrap();
        assert_eq!(
            probes,
            [
                Probe {
                    name: "port/cfg.h".into(),
                    quoted: true
                },
                Probe {
                    name: "x/y.h".into(),
                    quoted: false
                }
            ]
        );
        assert!(include_probes(b"#if __has_include(\"open\n").is_err());
        assert_eq!(include_probes(b"int x;"), Ok(vec![]));
        assert_eq!(
            include_probes(
                b"#if __has_include(\"a.h\")\n#elif __has_include_next(CFG) || 1\n#endif\n"
            ),
            Err("`__has_include(CFG)` on line 2".to_owned())
        );
        let wrapped = b"#define HAS(x) __has_include(x)\n#if HAS(<a.h>)\n#endif\n";
        assert!(include_probes(wrapped).unwrap_err().contains("HAS"));
    }

    #[test]
    fn unreadable_inputs_are_reported() {
        let t = Tree::new();
        assert!(matches!(
            t.scan(&["-c", "missing.c"]),
            Err(Unresolvable::Unreadable { .. })
        ));
        // A preprocessed source is shipped, not scanned.
        t.file("pre.i", "# 1 \"x.c\"\n#include \"never.h\"\n");
        t.file("never.h", "");
        let c = t.scan(&["-c", "pre.i"]).unwrap();
        assert_eq!(t.shipped(&c), ["pre.i"]);
    }

    // ---- Against the real compilers ------------------------------------------------------

    const SOURCES: &[(&str, &str)] = &[
        // No includes: gcc still reads stdc-predef.h, which it pre-includes itself.
        ("bare.c", "int x;\n"),
        (
            "io.c",
            "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n\
             int main(void) { puts(getenv(\"HOME\")); return (int)strlen(\"x\"); }\n",
        ),
        (
            "num.c",
            "#include <math.h>\n#include <stdint.h>\n#include <errno.h>\n#include <stdbool.h>\n\
             #include \"proj.h\"\ndouble f(double x) { return sqrt(x) + PROJ; }\n",
        ),
        (
            "sys.c",
            "#include <unistd.h>\n#include <sys/stat.h>\n#include <pthread.h>\n#include <limits.h>\n\
             #include <stdatomic.h>\n#include <immintrin.h>\nint g(void) { return PATH_MAX; }\n",
        ),
        (
            "containers.cpp",
            "#include <vector>\n#include <string>\n#include <map>\n#include <iostream>\n\
             int main() { std::map<std::string, std::vector<int>> m; std::cout << m.size(); }\n",
        ),
        (
            "algo.cpp",
            "#include <memory>\n#include <algorithm>\n#include <unordered_map>\n\
             #include <functional>\n#include <cmath>\n#include \"proj.h\"\n\
             int main() { auto p = std::make_unique<int>(PROJ); return *p; }\n",
        ),
    ];

    /// The files `compiler -M` lists, normalized.
    fn dash_m(compiler: &Path, args: &[String]) -> Vec<PathBuf> {
        let mut args = args.to_vec();
        args.push("-M".into());
        let out = process::capture(compiler, &args, None).unwrap();
        assert!(
            out.status.success(),
            "{} -M: {}",
            compiler.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        depfile::prerequisites(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .map(|p| {
                // Lexically: a test independent of `resolve_dots`.
                let mut out = PathBuf::from("/");
                for c in Path::new(&p).components() {
                    match c {
                        Component::ParentDir => {
                            out.pop();
                        }
                        Component::Normal(n) => out.push(n),
                        _ => {}
                    }
                }
                out
            })
            .collect()
    }

    fn median(mut times: Vec<Duration>) -> Duration {
        times.sort();
        times[times.len() / 2]
    }

    #[test]
    fn real_compilers_need_nothing_the_scan_leaves_out() {
        let t = Tree::new();
        t.file("inc/proj.h", "#include <stddef.h>\n#define PROJ 1\n");
        for (name, text) in SOURCES {
            t.file(name, text);
        }
        let records = t.dir("records");
        let here = std::env::current_dir().unwrap();
        let mut tested = 0;
        for name in ["gcc", "g++", "clang", "clang++"] {
            let path = crate::testing::require(name);
            let id = crate::compiler::identify(&path, &records).unwrap();
            let cxx = name.ends_with("++");
            for (source, _) in SOURCES.iter().filter(|(s, _)| s.ends_with(".cpp") == cxx) {
                let src = t.path(source);
                let inc = t.path("inc");
                let args: Vec<String> = ["-c", src.to_str().unwrap(), "-I", inc.to_str().unwrap()]
                    .map(String::from)
                    .to_vec();
                let c = args::classify(args.clone()).unwrap();
                let closure = scan_as(&c, &id, &here).unwrap();
                let times: Vec<Duration> = (0..9)
                    .map(|_| {
                        let start = Instant::now();
                        scan_as(&c, &id, &here).unwrap();
                        start.elapsed()
                    })
                    .collect();
                let needed = dash_m(&path, &args);
                let mut toolchain = 0;
                let mut missing = Vec::new();
                for f in &needed {
                    if id
                        .c_dirs
                        .iter()
                        .chain(&id.cxx_dirs)
                        .any(|d| f.starts_with(d) && is_toolchain_dir(Path::new(d)))
                    {
                        // Left to the toolchain archive: only ever gcc's or clang's own.
                        let s = f.to_string_lossy();
                        assert!(s.contains("/lib/gcc/") || s.contains("/lib/clang/"), "{s}");
                        toolchain += 1;
                    } else if !closure.files.contains(f) {
                        missing.push(f.clone());
                    }
                }
                assert!(
                    missing.is_empty(),
                    "{name} {source}: the scan misses {missing:?}"
                );
                assert!(closure.files.contains(&src));
                let shipped_needed = needed.len() - toolchain;
                eprintln!(
                    "{name:8} {source:15} -M: {:3} files ({toolchain:2} in the toolchain); \
                     scan ships {:3} ({:3} extra), {:4} dirs; scan takes {:?}",
                    needed.len(),
                    closure.files.len(),
                    closure.files.len() - shipped_needed,
                    closure.dirs.len(),
                    median(times),
                );
                // The preprocessor's list, with the probes added, is a superset too.
                let listed =
                    from_preprocessor(&path, &c, &SearchPath::of(&c, &id, &Env::default()), &here)
                        .unwrap();
                for f in needed.iter().filter(|f| !is_toolchain_file(&id, f)) {
                    assert!(
                        listed.files.contains(f),
                        "{name} {source}: -M list lacks {f:?}"
                    );
                }
                tested += 1;
            }
        }
        eprintln!("{tested} compiles compared");
    }

    fn is_toolchain_file(id: &Identity, f: &Path) -> bool {
        id.c_dirs
            .iter()
            .chain(&id.cxx_dirs)
            .any(|d| f.starts_with(d) && is_toolchain_dir(Path::new(d)))
    }

    #[test]
    fn a_computed_include_falls_back_to_the_preprocessor() {
        let gcc = crate::testing::require("gcc");
        let t = Tree::new();
        let src = t.file(
            "computed.c",
            "#define STR(x) #x\n#define XSTR(x) STR(x)\n#include XSTR(stdio.h)\n\
             #if __has_include(<stdlib.h>)\n#endif\n",
        );
        let id = crate::compiler::identify(&gcc, &t.dir("records")).unwrap();
        let c = compile(&["-c", src.to_str().unwrap(), "-o", "/dev/null"]);
        let here = std::env::current_dir().unwrap();
        assert!(matches!(
            scan_as(&c, &id, &here),
            Err(Unresolvable::Computed { line: 3, .. })
        ));
        let listed =
            from_preprocessor(&gcc, &c, &SearchPath::of(&c, &id, &Env::default()), &here).unwrap();
        assert!(listed
            .files
            .contains(&PathBuf::from("/usr/include/stdio.h")));
        // Only probed, so only the scan of the listed files finds it.
        assert!(listed
            .files
            .contains(&PathBuf::from("/usr/include/stdlib.h")));
        assert!(listed.files.contains(&src));
        assert!(!listed.files.iter().any(|f| is_toolchain_file(&id, f)));
        assert!(listed.dirs.contains(&PathBuf::from("/usr/include")));
    }
}
