//! Files inside a container's root, reached from the builder without ever leaving that root.
//!
//! Every path is resolved below the root by the kernel: on Linux with `openat2(RESOLVE_IN_ROOT)`,
//! where `..` stops at the root and a symlink is followed as the jail would follow it, inside
//! the root; on FreeBSD with `openat(O_RESOLVE_BENEATH)`, which refuses a walk that would leave
//! the root (an absolute symlink, a `..` above it) instead of clamping it there. Either way
//! nothing is reached in the builder's filesystem. The last component of a file written or read
//! is never a symlink. This holds even for a root a job has already written to, so outputs are
//! read here safely after the job.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};

use crate::JailError;

/// The most an output may weigh.
pub const MAX_OUTPUT: u64 = 1 << 30;

/// Opens the directory `rel` below `dir`, never leaving `dir`.
#[cfg(target_os = "linux")]
fn open_beneath(dir: std::os::fd::BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Errno> {
    use nix::fcntl::{openat2, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    openat2(dir, rel, how)
}

/// Opens the directory `rel` below `dir`, never leaving `dir` (FreeBSD 13 and later; a walk
/// that would leave it fails with `ENOTCAPABLE`).
#[cfg(target_os = "freebsd")]
fn open_beneath(dir: std::os::fd::BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Errno> {
    let beneath = OFlag::from_bits_retain(nix::libc::O_RESOLVE_BENEATH);
    nix::fcntl::openat(
        dir,
        rel,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | beneath,
        Mode::empty(),
    )
}

fn path_error(path: &Path, why: impl Into<String>) -> JailError {
    JailError::Path {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The normal components of an absolute jail path; `..` and relative paths are refused because
/// a client has no business naming them.
fn parts(path: &Path) -> Result<Vec<&std::ffi::OsStr>, JailError> {
    if !path.is_absolute() {
        return Err(path_error(path, "not an absolute path"));
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir => return Err(path_error(path, "`..` is not allowed")),
            Component::Prefix(_) => return Err(path_error(path, "not a jail path")),
        }
    }
    Ok(out)
}

/// A container root opened for resolving paths beneath it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    pub fn open(path: &Path) -> Result<Root, JailError> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(JailError::sys(format!(
            "opening the jail root {}",
            path.display()
        )))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        open_beneath(self.fd.as_fd(), rel)
    }

    /// Makes the directory `path` (and its parents) exist inside the root; directories it creates
    /// get mode 0755 and, with `owner`, that owner. Returns the directory, open.
    pub fn make_dirs(&self, path: &Path, owner: Option<(u32, u32)>) -> Result<OwnedFd, JailError> {
        let parts = parts(path)?;
        let mut rel = PathBuf::from(".");
        let mut dir = self
            .open_dir(&rel)
            .map_err(JailError::sys("opening the jail root"))?;
        for part in parts {
            rel.push(part);
            dir = match self.open_dir(&rel) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(dir.as_fd(), part, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(path_error(path, format!("cannot create directory: {e}")))
                        }
                    }
                    let fd = self
                        .open_dir(&rel)
                        .map_err(|e| path_error(path, format!("cannot open directory: {e}")))?;
                    if let Some((uid, gid)) = owner {
                        nix::unistd::fchown(
                            fd.as_fd(),
                            Some(nix::unistd::Uid::from_raw(uid)),
                            Some(nix::unistd::Gid::from_raw(gid)),
                        )
                        .map_err(JailError::sys(format!("chown {}", path.display())))?;
                    }
                    fd
                }
                Err(Errno::ENOTDIR) => {
                    return Err(path_error(path, "a component is not a directory"))
                }
                Err(e) => return Err(path_error(path, format!("cannot open directory: {e}"))),
            };
        }
        Ok(dir)
    }

    /// Gives an existing directory to the job's user, so the compiler can write there.
    pub fn chown_dir(&self, path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
        let dir = self.make_dirs(path, Some((uid, gid)))?;
        nix::unistd::fchown(
            dir.as_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(JailError::sys(format!("chown {}", path.display())))
    }

    /// Writes a file at `path` inside the root, creating its directories; an existing file is
    /// replaced, a symlink at that name is refused.
    pub fn write_file(&self, path: &Path, data: &[u8], executable: bool) -> Result<(), JailError> {
        let (dir, name) = self.parent_of(path)?;
        write_at(&dir, name, path, data, executable)
    }

    /// Reads the regular file at `path` inside the root. `Ok(None)` when it does not exist; an
    /// error when it is a symlink, a directory, a device or over `max` bytes.
    pub fn read_file(&self, path: &Path, max: u64) -> Result<Option<Vec<u8>>, JailError> {
        let (dir, name) = match self.parent_of_existing(path)? {
            Some(found) => found,
            None => return Ok(None),
        };
        let fd = match nix::fcntl::openat(
            dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(path_error(path, "output is a symlink")),
            Err(e) => return Err(path_error(path, format!("cannot open: {e}"))),
        };
        let stat = fstat(&fd).map_err(JailError::sys(format!("stat {}", path.display())))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(path_error(path, "output is not a regular file"));
        }
        if stat.st_size as u64 > max {
            return Err(path_error(
                path,
                format!(
                    "output of {} bytes is over the limit of {max}",
                    stat.st_size
                ),
            ));
        }
        let mut data = Vec::with_capacity(stat.st_size as usize);
        File::from(fd)
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(JailError::io(format!("reading {}", path.display())))?;
        if data.len() as u64 > max {
            return Err(path_error(
                path,
                "output grew past the limit while being read",
            ));
        }
        Ok(Some(data))
    }

    fn parent_of<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p std::ffi::OsStr), JailError> {
        let name = *parts(path)?
            .last()
            .ok_or_else(|| path_error(path, "names the root itself"))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        Ok((self.make_dirs(parent, None)?, name))
    }

    fn parent_of_existing<'p>(
        &self,
        path: &'p Path,
    ) -> Result<Option<(OwnedFd, &'p std::ffi::OsStr)>, JailError> {
        let name = *parts(path)?
            .last()
            .ok_or_else(|| path_error(path, "names the root itself"))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        let rel = Path::new(".").join(parent.strip_prefix("/").unwrap_or(parent));
        match self.open_dir(&rel) {
            Ok(fd) => Ok(Some((fd, name))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(path_error(path, format!("cannot open its directory: {e}"))),
        }
    }
}

/// Places many files in one root before any job has run in it, opening each directory once
/// (a job's inputs share a few dozen directories) and linking files instead of copying them
/// where it can.
///
/// Only for a root nothing untrusted has touched yet: the directories it keeps open are not
/// looked up again, which is safe only while no job can swap them for links.
#[derive(Debug)]
pub struct Placer<'r> {
    root: &'r Root,
    dirs: std::collections::HashMap<PathBuf, OwnedFd>,
    links: bool,
}

impl<'r> Placer<'r> {
    /// A placer for `root`; `links` allows hard links (see [`crate::Backend::links_inputs`]).
    pub fn new(root: &'r Root, links: bool) -> Placer<'r> {
        Placer {
            root,
            dirs: std::collections::HashMap::new(),
            links,
        }
    }

    fn dir_of<'p>(&mut self, path: &'p Path) -> Result<(&OwnedFd, &'p std::ffi::OsStr), JailError> {
        let name = *parts(path)?
            .last()
            .ok_or_else(|| path_error(path, "names the root itself"))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !self.dirs.contains_key(parent) {
            let fd = self.root.make_dirs(parent, None)?;
            self.dirs.insert(parent.to_path_buf(), fd);
        }
        Ok((&self.dirs[parent], name))
    }

    /// Puts the builder's file `source` at `path` in the root: a hard link when links are
    /// allowed, it is on the same filesystem and not executable (a link shares its mode), a
    /// copy otherwise. An existing file at `path` is replaced, a symlink refused.
    pub fn link_or_copy(
        &mut self,
        path: &Path,
        source: &Path,
        executable: bool,
    ) -> Result<(), JailError> {
        if self.links && !executable {
            let (dir, name) = self.dir_of(path)?;
            let link = || {
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    source,
                    dir.as_fd(),
                    name,
                    nix::fcntl::AtFlags::empty(),
                )
            };
            let mut linked = link();
            if linked == Err(Errno::EEXIST) {
                refuse_symlink(dir, name, path)?;
                let _ = nix::unistd::unlinkat(
                    dir.as_fd(),
                    name,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
                linked = link();
            }
            match linked {
                Ok(()) => return Ok(()),
                // Another filesystem, or links refused: copy.
                Err(Errno::EXDEV | Errno::EPERM | Errno::EMLINK) => {}
                Err(e) => return Err(path_error(path, format!("cannot link: {e}"))),
            }
        }
        let data = std::fs::read(source)
            .map_err(JailError::io(format!("reading {}", source.display())))?;
        self.write_file(path, &data, executable)
    }

    /// Makes the root hold exactly `files` (a jail path, the builder's file to link or copy
    /// there, executable) and `dirs`, with the directories they need and nothing else: a file
    /// already linked to the same source is kept, any other listed one is placed, and files
    /// and directories not wanted are removed. Kept directories are given back to the builder
    /// with mode 0755, whatever an earlier job's placement made of them.
    ///
    /// For a root that keeps a container's inputs from one job to the next, which only the
    /// builder ever writes (a lower layer of the job's overlay): consecutive jobs of one project
    /// share most of their headers, and a link kept costs a `stat` where a new one costs a
    /// journalled write. What the next job sees is still a function of its own request only:
    /// no directory named after another client's paths, and none where the toolchain image has
    /// a file.
    pub fn sync(
        &mut self,
        files: &[(PathBuf, PathBuf, bool)],
        dirs: &[PathBuf],
    ) -> Result<Synced, JailError> {
        use std::os::unix::fs::MetadataExt;
        let mut synced = Synced::default();
        let slash = |p: &Path| Path::new("/").join(p);
        let wanted = Wanted {
            files: files.iter().map(|(path, _, _)| slash(path)).collect(),
            dirs: files
                .iter()
                .filter_map(|(path, _, _)| path.parent())
                .chain(dirs.iter().map(PathBuf::as_path))
                .flat_map(Path::ancestors)
                .map(slash)
                .collect(),
            owner: (nix::unistd::geteuid(), nix::unistd::getegid()),
        };
        synced.removed = remove_unwanted(&self.root.path, Path::new("/"), &wanted)?;
        for dir in dirs {
            if !self.dirs.contains_key(dir) {
                let fd = self.root.make_dirs(dir, None)?;
                self.dirs.insert(dir.clone(), fd);
            }
        }
        for (path, source, executable) in files {
            if self.links && !*executable {
                let (dir, name) = self.dir_of(path)?;
                let here = nix::sys::stat::fstatat(
                    dir.as_fd(),
                    name,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                );
                if let (Ok(here), Ok(there)) = (&here, std::fs::metadata(source)) {
                    if (here.st_dev, here.st_ino) == (there.dev(), there.ino()) {
                        synced.kept += 1;
                        continue;
                    }
                }
                // A directory an earlier job needed where this one wants a file.
                if here.is_ok_and(|h| {
                    SFlag::from_bits_truncate(h.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                }) {
                    let host = self.root.path.join(path.strip_prefix("/").unwrap_or(path));
                    std::fs::remove_dir_all(&host)
                        .map_err(JailError::io(format!("removing {}", host.display())))?;
                }
            }
            self.link_or_copy(path, source, *executable)?;
            synced.placed += 1;
        }
        Ok(synced)
    }

    /// [`Root::write_file`] through the open directories.
    pub fn write_file(
        &mut self,
        path: &Path,
        data: &[u8],
        executable: bool,
    ) -> Result<(), JailError> {
        let (dir, name) = self.dir_of(path)?;
        write_at(dir, name, path, data, executable)
    }
}

/// What [`Placer::sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    pub kept: usize,
    pub placed: usize,
    pub removed: usize,
}

/// What [`Placer::sync`] keeps: jail paths, and the owner of kept directories.
struct Wanted {
    files: std::collections::HashSet<PathBuf>,
    dirs: std::collections::HashSet<PathBuf>,
    owner: (nix::unistd::Uid, nix::unistd::Gid),
}

/// Removes what is under `host_root` (below the jail path `at`) and not wanted, and resets the
/// directories that stay. Never follows a link: the tree is the builder's own, but it holds
/// what jobs asked for.
fn remove_unwanted(host_root: &Path, at: &Path, wanted: &Wanted) -> Result<usize, JailError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = host_root.join(at.strip_prefix("/").unwrap_or(at));
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(JailError::io(format!("listing {}", dir.display()))(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(JailError::io(format!("listing {}", dir.display())))?;
        let jail_path = at.join(entry.file_name());
        let host = entry.path();
        let meta = entry
            .metadata()
            .map_err(JailError::io(format!("reading {}", host.display())))?;
        if meta.is_dir() && wanted.dirs.contains(&jail_path) {
            let (uid, gid) = wanted.owner;
            if (meta.uid(), meta.gid()) != (uid.as_raw(), gid.as_raw()) {
                nix::unistd::chown(&host, Some(uid), Some(gid))
                    .map_err(JailError::sys(format!("chown {}", host.display())))?;
            }
            if meta.mode() & 0o7777 != 0o755 {
                std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))
                    .map_err(JailError::io(format!("chmod {}", host.display())))?;
            }
            removed += remove_unwanted(host_root, &jail_path, wanted)?;
        } else if meta.is_dir() {
            std::fs::remove_dir_all(&host)
                .map_err(JailError::io(format!("removing {}", host.display())))?;
            removed += 1;
        } else if !wanted.files.contains(&jail_path) {
            std::fs::remove_file(&host)
                .map_err(JailError::io(format!("removing {}", host.display())))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn refuse_symlink(dir: &OwnedFd, name: &std::ffi::OsStr, path: &Path) -> Result<(), JailError> {
    match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
            Err(path_error(path, "is a symlink"))
        }
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            Err(path_error(path, "is a directory"))
        }
        _ => Ok(()),
    }
}

fn write_at(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    path: &Path,
    data: &[u8],
    executable: bool,
) -> Result<(), JailError> {
    let mode = if executable { 0o755 } else { 0o644 };
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| match e {
        Errno::ELOOP => path_error(path, "is a symlink"),
        e => path_error(path, format!("cannot create: {e}")),
    })?;
    let mut file = File::from(fd);
    file.write_all(data)
        .map_err(JailError::io(format!("writing {}", path.display())))?;
    // O_TRUNC on an existing file keeps its old mode.
    nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
        .map_err(JailError::sys(format!("chmod {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_inside_and_never_outside() {
        let host = tempfile::tempdir().unwrap();
        let root_dir = host.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, b"host secret").unwrap();
        let root = Root::open(&root_dir).unwrap();

        root.write_file(Path::new("/src/a/b.c"), b"int x;", false)
            .unwrap();
        assert_eq!(
            std::fs::read(root_dir.join("src/a/b.c")).unwrap(),
            b"int x;"
        );
        assert_eq!(
            root.read_file(Path::new("/src/a/b.c"), 100)
                .unwrap()
                .unwrap(),
            b"int x;"
        );
        assert_eq!(root.read_file(Path::new("/src/none.o"), 100).unwrap(), None);
        assert_eq!(
            root.read_file(Path::new("/nodir/none.o"), 100).unwrap(),
            None
        );

        // A symlink pointing out of the root, as a job could leave one: reading it is refused.
        std::os::unix::fs::symlink(&secret, root_dir.join("src/out.o")).unwrap();
        assert!(root.read_file(Path::new("/src/out.o"), 100).is_err());
        // A directory symlink pointing out is followed inside the root only: the host file
        // behind it is not reached.
        std::os::unix::fs::symlink(host.path(), root_dir.join("escape")).unwrap();
        assert_eq!(
            root.read_file(Path::new("/escape/secret"), 100).unwrap(),
            None
        );
        // Writing through it resolves inside the root, where the target does not exist.
        assert!(root
            .write_file(Path::new("/escape/secret"), b"overwritten", false)
            .is_err());
        assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");

        // Writing onto a symlink is refused rather than followed.
        assert!(root
            .write_file(Path::new("/src/out.o"), b"x", false)
            .is_err());
        assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");

        assert!(root.write_file(Path::new("relative"), b"x", false).is_err());
        assert!(root
            .write_file(Path::new("/a/../../b"), b"x", false)
            .is_err());
        assert!(
            root.read_file(Path::new("/src/a/b.c"), 3).is_err(),
            "size cap ignored"
        );
        assert!(
            root.read_file(Path::new("/src/a"), 100).is_err(),
            "read a directory"
        );
    }

    #[test]
    fn sync_keeps_shared_links_replaces_changed_files_and_removes_the_rest() {
        let host = tempfile::tempdir().unwrap();
        let store = host.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let src = |name: &str, data: &str| {
            let p = store.join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let (a, b, c) = (src("a", "A"), src("b", "B"), src("c", "C"));
        let root_dir = host.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        let root = Root::open(&root_dir).unwrap();
        let first = vec![
            (PathBuf::from("/usr/include/a.h"), a.clone(), false),
            (PathBuf::from("/src/b.h"), b.clone(), false),
            (PathBuf::from("/src/sub/gone.h"), c.clone(), false),
        ];
        let done = Placer::new(&root, true).sync(&first, &[]).unwrap();
        assert_eq!((done.kept, done.placed, done.removed), (0, 3, 0));

        // The next job: a.h shared, b.h changed (another source), gone.h not wanted, and a
        // file where the last job had a directory.
        let b2 = src("b2", "B2");
        let next = vec![
            (PathBuf::from("/usr/include/a.h"), a.clone(), false),
            (PathBuf::from("/src/b.h"), b2, false),
            (PathBuf::from("/src/sub"), c, false),
        ];
        let done = Placer::new(&root, true).sync(&next, &[]).unwrap();
        assert_eq!((done.kept, done.placed, done.removed), (1, 2, 1));
        assert_eq!(std::fs::read(root_dir.join("src/b.h")).unwrap(), b"B2");
        assert_eq!(std::fs::read(root_dir.join("src/sub")).unwrap(), b"C");
        assert_eq!(
            std::fs::read(&b).unwrap(),
            b"B",
            "a replaced link wrote its source"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(root_dir.join("usr/include/a.h"))
                .unwrap()
                .ino(),
            std::fs::metadata(&a).unwrap().ino(),
            "inputs are links to the builder's files"
        );
    }

    #[test]
    fn sync_leaves_only_this_jobs_directories() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let host = tempfile::tempdir().unwrap();
        let source = host.path().join("x.c");
        std::fs::write(&source, "int x;").unwrap();
        let root_dir = host.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        let root = Root::open(&root_dir).unwrap();
        // An earlier client's job: its paths say who it was and what it built, and it asked
        // for a directory where the toolchain has a program.
        let alice = vec![(
            PathBuf::from("/home/alice/secret-merger/x.c"),
            source.clone(),
            false,
        )];
        let dirs = [
            PathBuf::from("/home/alice/secret-merger/build"),
            PathBuf::from("/usr/libexec/gcc/cc1"),
        ];
        Placer::new(&root, true).sync(&alice, &dirs).unwrap();
        assert!(root_dir.join("usr/libexec/gcc/cc1").is_dir());
        root.chown_dir(Path::new("/home/alice/secret-merger"), 4242, 4242)
            .unwrap();
        std::fs::set_permissions(
            root_dir.join("home"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();

        let bob = vec![(PathBuf::from("/home/bob/x.c"), source, false)];
        let done = Placer::new(&root, true)
            .sync(&bob, &[PathBuf::from("/home/bob/out")])
            .unwrap();
        assert_eq!(done.placed, 1);
        let mut left: Vec<String> = Vec::new();
        let mut stack = vec![root_dir.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                left.push(p.strip_prefix(&root_dir).unwrap().display().to_string());
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
        left.sort();
        assert_eq!(left, ["home", "home/bob", "home/bob/out", "home/bob/x.c"]);
        let home = std::fs::metadata(root_dir.join("home")).unwrap();
        assert_eq!(
            home.mode() & 0o7777,
            0o755,
            "a kept directory keeps its old mode"
        );
        assert_eq!(home.uid(), nix::unistd::geteuid().as_raw());
    }
}
