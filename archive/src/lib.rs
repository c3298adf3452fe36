//! Toolchain archives: a gzip-compressed tar, packed deterministically so that the same files
//! always give the same bytes (and so the same digest), and unpacked as hostile input.
//!
//! Unpacking accepts regular files, directories, hard links to files of the same archive and
//! relative symlinks that stay inside the destination. It refuses absolute or `..` paths, entries
//! placed below a symlink, device nodes, FIFOs and sparse files, and it stops as soon as the
//! archive expands past a byte, entry, path-length or depth limit, so a gzip bomb costs nothing
//! but the bytes read up to the limit. Permission bits are reduced to `rwxr-xr-x`: no setuid,
//! setgid, sticky or group/other write bit survives.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

/// What goes into an archive at one relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir,
    /// A host file whose bytes are copied in.
    File {
        host: PathBuf,
        executable: bool,
    },
    /// A symlink; the target must be relative and stay inside the archive.
    Symlink(PathBuf),
}

/// An archive being described: relative paths to what they hold, kept sorted so packing is
/// deterministic.
#[derive(Debug, Default, Clone)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, Source>,
}

impl Manifest {
    /// Adds an entry at `path` (relative, no `..`); a later add of the same path wins.
    pub fn add(&mut self, path: impl Into<PathBuf>, source: Source) {
        self.entries.insert(path.into(), source);
    }

    /// Writes the archive: entries in path order, with zero timestamps and owners, and modes
    /// that depend only on whether a file is executable.
    pub fn pack(&self, out: impl Write) -> io::Result<()> {
        self.pack_with_progress(out, &mut |_, _| {})
    }

    /// [`Manifest::pack`], telling `progress` the file bytes packed so far and in all.
    pub fn pack_with_progress(
        &self,
        out: impl Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> io::Result<()> {
        let total: u64 = self
            .entries
            .values()
            .filter_map(|s| match s {
                Source::File { host, .. } => fs::metadata(host).ok().map(|m| m.len()),
                _ => None,
            })
            .sum();
        let mut done = 0u64;
        let gz = GzEncoder::new(out, Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        for (path, source) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            match source {
                Source::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    tar.append_data(&mut header, path, io::empty())?;
                }
                Source::File { host, executable } => {
                    let file = fs::File::open(host).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", host.display()))
                    })?;
                    let len = file.metadata()?.len();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(if *executable { 0o755 } else { 0o644 });
                    header.set_size(len);
                    // A file that grows while being packed must not corrupt the stream.
                    tar.append_data(&mut header, path, file.take(len))?;
                    done += len;
                    progress(done, total);
                }
                Source::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)?;
                }
            }
        }
        tar.into_inner()?.finish()?.flush()
    }
}

/// Caps that stop a hostile archive early.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Decompressed bytes, headers included.
    pub max_bytes: u64,
    pub max_entries: u64,
    pub max_path: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 8 << 30,
            max_entries: 200_000,
            max_path: 1024,
            max_depth: 48,
        }
    }
}

/// Why an archive was refused. Each names the entry at fault.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive entry {0:?}: absolute paths are not allowed")]
    Absolute(PathBuf),
    #[error("archive entry {0:?}: `..` is not allowed in paths")]
    Traversal(PathBuf),
    #[error("archive entry {0:?}: empty path")]
    EmptyPath(PathBuf),
    #[error("archive entry {path:?}: link target {target:?} leaves the archive")]
    EscapingLink { path: PathBuf, target: PathBuf },
    #[error("archive entry {0:?}: lies below a symlink")]
    ThroughLink(PathBuf),
    #[error("archive entry {path:?}: {kind} entries are not allowed")]
    Unsupported { path: PathBuf, kind: String },
    #[error("archive entry {0:?}: appears twice or clashes with an earlier entry")]
    Duplicate(PathBuf),
    #[error("archive entry {0:?}: hard link to something that is not a file of this archive")]
    BadHardLink(PathBuf),
    #[error("archive entry {path:?}: path of {len} bytes is over the limit of {max}")]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("archive entry {path:?}: {depth} levels deep, over the limit of {max}")]
    TooDeep {
        path: PathBuf,
        depth: usize,
        max: usize,
    },
    #[error("archive has more than {0} entries")]
    TooManyEntries(u64),
    #[error("archive's symlinks lead through each other for more than {0} steps")]
    TangledLinks(u64),
    #[error("archive expands past the limit of {0} bytes")]
    TooLarge(u64),
    #[error("reading the archive: {0}")]
    Read(io::Error),
    #[error("unpacking {path:?}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What an unpack produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Unpacks a compressed archive into `dest`, which must be a fresh directory that nothing else
/// writes while this runs. On error, `dest` holds a partial tree the caller removes.
pub fn unpack(
    compressed: impl Read,
    dest: &Path,
    limits: &Limits,
) -> Result<Unpacked, ArchiveError> {
    let counted = Counted {
        inner: GzDecoder::new(compressed),
        left: limits.max_bytes,
    };
    fs::create_dir_all(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(counted);
    let mut done = Unpacked::default();
    let mut entries_seen = 0u64;
    let mut links = Vec::new();
    let entries = archive.entries().map_err(read_error(limits))?;
    for entry in entries {
        let mut entry = entry.map_err(read_error(limits))?;
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let raw = entry.path().map_err(read_error(limits))?.into_owned();
        let rel = checked_path(&raw, limits)?;
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        ensure_parents(dest, &rel)?;
        let write_err = |source| ArchiveError::Write {
            path: rel.clone(),
            source,
        };
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(ArchiveError::Duplicate(rel)),
                Err(_) => fs::create_dir(&target).map_err(write_err)?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(read_error(limits))?;
                if size > limits.max_bytes {
                    return Err(ArchiveError::TooLarge(limits.max_bytes));
                }
                let mode = entry.header().mode().map_err(read_error(limits))? & 0o755;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    // create_new is O_CREAT|O_EXCL: it never follows a symlink at the path.
                    .mode(mode | 0o600)
                    .open(&target)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => ArchiveError::Duplicate(rel.clone()),
                        _ => write_err(e),
                    })?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut file).map_err(|e| {
                    if is_limit(&e) {
                        ArchiveError::TooLarge(limits.max_bytes)
                    } else {
                        ArchiveError::Read(e)
                    }
                })?;
                // umask may have masked the mode at creation; set exactly what we allow.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(write_err)?;
                done.files += 1;
                done.bytes += copied;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(read_error(limits))?
                    .ok_or_else(|| ArchiveError::EmptyPath(rel.clone()))?
                    .into_owned();
                // Capped like entry names: resolving a long target costs a step per part.
                let len = link.as_os_str().len();
                if len > limits.max_path {
                    return Err(ArchiveError::PathTooLong {
                        path: rel,
                        len,
                        max: limits.max_path,
                    });
                }
                if !link_stays_inside(&rel, &link) {
                    return Err(ArchiveError::EscapingLink {
                        path: rel,
                        target: link,
                    });
                }
                std::os::unix::fs::symlink(&link, &target).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ArchiveError::Duplicate(rel.clone()),
                    _ => write_err(e),
                })?;
                links.push((rel, link));
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(read_error(limits))?
                    .ok_or_else(|| ArchiveError::BadHardLink(rel.clone()))?
                    .into_owned();
                let source_rel = checked_path(&link, limits)?;
                ensure_parents(dest, &source_rel)
                    .map_err(|_| ArchiveError::BadHardLink(rel.clone()))?;
                let source = dest.join(&source_rel);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if meta.file_type().is_file() => {}
                    _ => return Err(ArchiveError::BadHardLink(rel)),
                }
                fs::hard_link(&source, &target).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ArchiveError::Duplicate(rel.clone()),
                    _ => write_err(e),
                })?;
            }
            tar::EntryType::XGlobalHeader => {}
            other => {
                return Err(ArchiveError::Unsupported {
                    path: rel,
                    kind: format!("{other:?}"),
                })
            }
        }
    }
    // Each link stays inside on its own, but one may lead through others: with `s -> .`,
    // `l -> s/..` names the destination's parent. Only the whole tree can tell (found by
    // `fuzz/`). Each walk is capped at 40 links, and all of them share one budget of steps, so
    // that links leading through each other cannot make the check itself the attack.
    let mut steps = LINK_STEPS;
    for (path, target) in links {
        match resolves_inside(dest, &path, &mut steps) {
            Some(true) => {}
            Some(false) => return Err(ArchiveError::EscapingLink { path, target }),
            None => return Err(ArchiveError::TangledLinks(LINK_STEPS)),
        }
    }
    Ok(done)
}

/// Path components the link check may walk for a whole archive: each costs a `readlink`
/// (about a microsecond). The gcc toolchains kiln packages have 14 links and take 68 steps.
const LINK_STEPS: u64 = 1_000_000;

fn read_error(limits: &Limits) -> impl Fn(io::Error) -> ArchiveError + '_ {
    move |e| {
        if is_limit(&e) {
            ArchiveError::TooLarge(limits.max_bytes)
        } else {
            ArchiveError::Read(e)
        }
    }
}

/// A relative, normal path within the limits.
fn checked_path(raw: &Path, limits: &Limits) -> Result<PathBuf, ArchiveError> {
    let len = raw.as_os_str().len();
    if len > limits.max_path {
        return Err(ArchiveError::PathTooLong {
            path: raw.to_path_buf(),
            len,
            max: limits.max_path,
        });
    }
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ArchiveError::Traversal(raw.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::Absolute(raw.to_path_buf()))
            }
        }
    }
    let depth = out.components().count();
    if depth == 0 {
        return Err(ArchiveError::EmptyPath(raw.to_path_buf()));
    }
    if depth > limits.max_depth {
        return Err(ArchiveError::TooDeep {
            path: raw.to_path_buf(),
            depth,
            max: limits.max_depth,
        });
    }
    Ok(out)
}

/// Makes every ancestor of `rel` a real directory under `dest`, refusing to go through a symlink
/// or a file. `dest` is fresh and ours alone, so what `symlink_metadata` sees stays true.
fn ensure_parents(dest: &Path, rel: &Path) -> Result<(), ArchiveError> {
    let mut dir = dest.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ArchiveError::ThroughLink(rel.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(|source| ArchiveError::Write {
                    path: rel.to_path_buf(),
                    source,
                })?
            }
            Err(source) => {
                return Err(ArchiveError::Write {
                    path: rel.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Whether a symlink at `rel` pointing at `target` resolves, lexically, inside the archive root.
/// Absolute targets are refused: they would mean one thing inside a jail and another to anyone
/// reading the tree from outside.
pub fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    let mut depth = rel.components().count().saturating_sub(1) as isize;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    !target.as_os_str().is_empty()
}

/// Whether `rel` below `dest` resolves inside it, following the symlinks on the way as the
/// kernel does: a link's target is walked from the link's directory, and a `..` after a link
/// leaves what the link points at. A missing component counts as a directory (a `..` after
/// it is still checked), and a path that needs more than 40 links is not inside. `None` once
/// `steps` (components walked, shared by every call) run out.
fn resolves_inside(dest: &Path, rel: &Path, steps: &mut u64) -> Option<bool> {
    // What is left to walk, next component last; where the walk is, in real directories.
    let mut todo: Vec<std::ffi::OsString> = rel.iter().rev().map(Into::into).collect();
    let mut at = dest.to_path_buf();
    let mut depth = 0usize;
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        *steps = steps.checked_sub(1)?;
        if part == "." {
            continue;
        }
        if part == ".." {
            if depth == 0 {
                return Some(false);
            }
            at.pop();
            depth -= 1;
            continue;
        }
        at.push(&part);
        match fs::read_link(&at) {
            Ok(target) => {
                hops += 1;
                if hops > 40 || target.is_absolute() {
                    return Some(false);
                }
                at.pop();
                todo.extend(target.iter().rev().map(Into::into));
            }
            Err(_) => depth += 1,
        }
    }
    Some(true)
}

const LIMIT_MARK: &str = "kiln-archive-limit";

fn is_limit(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.to_string() == LIMIT_MARK)
}

/// A reader that fails once more than `left` bytes have come through it.
struct Counted<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(LIMIT_MARK));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
