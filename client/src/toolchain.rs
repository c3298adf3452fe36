//! Toolchain archives: the local compiler, packed so that a builder of the farm can run the
//! very command line the client would have run.
//!
//! A builder runs the job in a jail whose root is the unpacked archive plus the job's input
//! files at their original absolute paths. So the archive holds, at their absolute paths (stored
//! relative to `/`), everything the driver needs to turn a preprocessor-complete C or C++ compile
//! into an object:
//!
//! - the driver as the user named it (`/usr/bin/gcc`) with every link on the way to the binary
//!   (`gcc -> gcc-12 -> x86_64-linux-gnu-gcc-12`, `/etc/alternatives/cc`);
//! - gcc: `cc1`, `cc1plus`, `as`, `specs`, `liblto_plugin.so` and the compiler's private include
//!   directories, all where the driver itself reports them (`-print-prog-name`,
//!   `-print-file-name`);
//! - clang: the resource directory's `include/` and `share/` (clang assembles in-process), and
//!   the `crtbegin.o` of the GCC installation it selected, without which clang does not detect
//!   that installation and so does not search libstdc++'s headers;
//! - the shared-library closure of each program, from `ldd`, the dynamic loader included.
//!
//! System headers (`/usr/include`, `/usr/local/include`) stay out: each job ships the headers it
//! reads as inputs.
//!
//! Each file goes in at its real path. A symlink met on the way, a directory like
//! `/lib -> usr/lib` on a merged-/usr system as much as `gcc -> gcc-12`, becomes a symlink entry
//! with a relative target, because the unpacker refuses entries below a symlink and targets that
//! are absolute or leave the archive.
//!
//! [`ensure`] keeps one archive per compiler in `DIR/toolchains/`, so it is packed once, not on
//! every compile.

use crate::progress::Progress;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use kiln_archive::{link_stays_inside, Manifest, Source};
use kiln_cache::{Digest, Hasher};
use serde::{Deserialize, Serialize};

use crate::process;

/// A packed toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    /// `Digest::of` the compressed archive: what builders verify and cache it by.
    pub digest: Digest,
    /// Bytes of the compressed archive.
    pub size: u64,
    /// The `.tar.gz` file.
    pub archive: PathBuf,
}

/// What goes into the archive for `compiler` (a path as the user runs it; a relative one is
/// taken from the current directory). Runs the compiler's `-print-*` probes and `ldd`.
pub fn manifest(compiler: &Path) -> anyhow::Result<Manifest> {
    let compiler = std::path::absolute(compiler)
        .with_context(|| format!("cannot make {} absolute", compiler.display()))?;
    let mut c = Collector::default();
    c.add_program(&compiler)
        .with_context(|| format!("cannot package the compiler {}", compiler.display()))?;
    let version = ask(&compiler, "--version")?;
    // The same test as `compiler::identify`: clang says its name, gcc and g++ do not.
    if version.contains("clang") {
        clang_parts(&mut c, &compiler)?;
    } else {
        gcc_parts(&mut c, &compiler)?;
    }
    check(&c.manifest)?;
    Ok(c.manifest)
}

/// Packs `compiler` into `out` (written atomically) and returns its digest and size.
pub fn package(compiler: &Path, out: &Path) -> anyhow::Result<Toolchain> {
    use std::io::IsTerminal;
    let bytes = pack(compiler, std::io::stderr().is_terminal())?;
    kiln_cache::write_atomically(out, &bytes)
        .with_context(|| format!("cannot write the toolchain archive {}", out.display()))?;
    Ok(Toolchain {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        archive: out.to_path_buf(),
    })
}

/// The archive bytes. Packed in memory because the digest is of the whole compressed archive
/// and the store's `Digest` has no streaming form; one archive is tens of megabytes.
fn pack(compiler: &Path, tty: bool) -> anyhow::Result<Vec<u8>> {
    let manifest = manifest(compiler)?;
    let mut bytes = Vec::new();
    let mut progress = Progress::new(
        format!("packaging {} for the farm", compiler.display()),
        tty,
    );
    let packed =
        manifest.pack_with_progress(&mut bytes, &mut |done, total| progress.update(done, total));
    progress.finish();
    packed.with_context(|| format!("cannot pack the toolchain of {}", compiler.display()))?;
    Ok(bytes)
}

/// How long a packing marker holds before it is taken for the leftover of a crashed kiln.
const PACKING_STALE: Duration = Duration::from_secs(600);
/// Temporary files of interrupted writers older than this are removed.
const TMP_STALE: Duration = Duration::from_secs(3600);
/// Version of [`Record`], and of what [`manifest`] puts in an archive: a change to either makes
/// earlier archives misses.
const FORMAT: u32 = 1;

/// `DIR/toolchains/<key>.json`: which archive belongs to a compiler and how to know it is
/// still the file that was packed.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    version: u32,
    digest: String,
    size: u64,
    mtime_ns: i64,
    ino: u64,
}

/// The toolchain of the compiler at `compiler` (as the compile runs it) whose identity is
/// `identity`, packed on first use into `cache_dir/toolchains/<key>.tar.gz` with a record of
/// its digest beside it.
///
/// The key is the identity *and* the path: `clang` and `clang++`, or `cc` and `gcc`, are one
/// binary with one identity, but the builder runs the name the user gave, so each name needs an
/// archive holding its own link.
///
/// Several kiln processes may ask at once (a parallel build's first remote compiles). One packs;
/// the others get an error saying so, and their compiles run locally meanwhile, rather than each
/// spending seconds of CPU and an archive's worth of memory on the same bytes. The archive and
/// record are written to temporary files and renamed into place, and a packer that finds a
/// finished record when done discards its own result.
/// With `tty` (stderr is a terminal), packing shows its progress there.
pub fn ensure(
    cache_dir: &Path,
    compiler: &Path,
    identity: &Digest,
    tty: bool,
) -> anyhow::Result<Toolchain> {
    let compiler = std::path::absolute(compiler)
        .with_context(|| format!("cannot make {} absolute", compiler.display()))?;
    let key = Hasher::new("kiln toolchain")
        .field(&FORMAT.to_le_bytes())
        .digest(identity)
        .field(compiler.as_os_str().as_encoded_bytes())
        .finish()
        .to_hex();
    let dir = cache_dir.join("toolchains");
    let archive = dir.join(format!("{key}.tar.gz"));
    let record = dir.join(format!("{key}.json"));
    if let Some(t) = cached(&archive, &record) {
        return Ok(t);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let marker = dir.join(format!("{key}.packing"));
    let Some(_packing) = Packing::start(&marker)? else {
        bail!(
            "the toolchain of {} is being packaged by another kiln process (marker {})",
            compiler.display(),
            marker.display()
        );
    };
    // Another process may have finished between the first look and taking the marker.
    if let Some(t) = cached(&archive, &record) {
        return Ok(t);
    }
    sweep_tmp(&dir);
    let bytes = pack(&compiler, tty)?;
    // A packer that took over a stale marker may have raced with us; theirs stands.
    if let Some(t) = cached(&archive, &record) {
        return Ok(t);
    }
    let digest = Digest::of(&bytes);
    kiln_cache::write_atomically(&archive, &bytes)
        .with_context(|| format!("cannot write {}", archive.display()))?;
    let meta =
        fs::metadata(&archive).with_context(|| format!("cannot stat {}", archive.display()))?;
    let rec = Record {
        version: FORMAT,
        digest: digest.to_hex(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        ino: meta.ino(),
    };
    kiln_cache::write_atomically(&record, &serde_json::to_vec(&rec)?)
        .with_context(|| format!("cannot write {}", record.display()))?;
    Ok(Toolchain {
        digest,
        size: meta.len(),
        archive,
    })
}

/// The recorded toolchain, if the record is readable and the archive is still the file it
/// describes. Cheap (a small read and a stat) because it runs on every remote compile; a
/// damaged archive that kept its size and times is caught by the builder, which checks the
/// digest.
/// A toolchain archive the user supplies for a compiler (a cross compiler, say, packed with
/// `kiln toolchain package` on another machine). Its digest is remembered beside the cache's own
/// archives and recomputed when the file changes.
pub fn supplied(cache_dir: &Path, archive: &Path) -> anyhow::Result<Toolchain> {
    let archive = std::path::absolute(archive)
        .with_context(|| format!("cannot make {} absolute", archive.display()))?;
    let key = Hasher::new("kiln supplied toolchain")
        .field(&FORMAT.to_le_bytes())
        .field(archive.as_os_str().as_encoded_bytes())
        .finish()
        .to_hex();
    let dir = cache_dir.join("toolchains");
    let record = dir.join(format!("{key}.json"));
    if let Some(t) = cached(&archive, &record) {
        return Ok(t);
    }
    let bytes = fs::read(&archive)
        .with_context(|| format!("cannot read the toolchain archive {}", archive.display()))?;
    let meta = fs::metadata(&archive)?;
    let rec = Record {
        version: FORMAT,
        digest: Digest::of(&bytes).to_hex(),
        size: bytes.len() as u64,
        mtime_ns: mtime_ns(&meta),
        ino: meta.ino(),
    };
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    kiln_cache::write_atomically(&record, &serde_json::to_vec(&rec)?)
        .with_context(|| format!("cannot write {}", record.display()))?;
    cached(&archive, &record).context("the toolchain archive changed while it was read")
}

fn cached(archive: &Path, record: &Path) -> Option<Toolchain> {
    let rec: Record = serde_json::from_slice(&fs::read(record).ok()?).ok()?;
    let meta = fs::metadata(archive).ok()?;
    let same = rec.version == FORMAT
        && rec.size == meta.len()
        && rec.mtime_ns == mtime_ns(&meta)
        && rec.ino == meta.ino();
    same.then_some(())?;
    Some(Toolchain {
        digest: rec.digest.parse().ok()?,
        size: rec.size,
        archive: archive.to_path_buf(),
    })
}

fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// A marker file saying a packer is at work, removed when dropped.
#[derive(Debug)]
struct Packing(PathBuf);

impl Packing {
    /// Takes the marker, or `None` when a live packer holds it. A marker older than
    /// [`PACKING_STALE`] is the leftover of a crash and is taken over.
    fn start(path: &Path) -> anyhow::Result<Option<Packing>> {
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
        };
        match create() {
            Ok(_) => return Ok(Some(Packing(path.to_path_buf()))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
        let age = fs::metadata(path)
            .and_then(|m| m.modified())
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
        match age {
            Ok(age) if age < PACKING_STALE => Ok(None),
            // Stale, or gone since: remove and try once more. Two takers may both win; the
            // archive and record are renamed into place, so that only costs work.
            _ => {
                let _ = fs::remove_file(path);
                match create() {
                    Ok(_) => Ok(Some(Packing(path.to_path_buf()))),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
                }
            }
        }
    }
}

impl Drop for Packing {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Removes temporary files that an interrupted writer left in `dir` (best effort).
fn sweep_tmp(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > TMP_STALE);
        if old && entry.file_name().to_string_lossy().starts_with(".tmp.") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Runs `compiler ARG` and returns its standard output, trimmed.
fn ask(compiler: &Path, arg: &str) -> anyhow::Result<String> {
    let out = process::probe(compiler, &[arg.to_owned()])
        .with_context(|| format!("cannot run {} {arg}", compiler.display()))?;
    if !out.status.success() {
        bail!(
            "{} {arg} failed: {}",
            compiler.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A path the driver printed, if it names something that exists: `-print-prog-name` and
/// `-print-file-name` echo the bare name back when they find nothing.
fn found(printed: &str) -> Option<PathBuf> {
    let path = Path::new(printed);
    (path.is_absolute() && path.exists()).then(|| path.to_path_buf())
}

fn gcc_parts(c: &mut Collector, compiler: &Path) -> anyhow::Result<()> {
    let cc1 = ask(compiler, "-print-prog-name=cc1")?;
    let cc1 = found(&cc1).with_context(|| {
        format!(
            "{} does not know where its cc1 is (it said {cc1:?})",
            compiler.display()
        )
    })?;
    c.add_program(&cc1)?;
    // A gcc without its C++ front end has no cc1plus; it cannot compile C++ here either.
    if let Some(cc1plus) = found(&ask(compiler, "-print-prog-name=cc1plus")?) {
        c.add_program(&cc1plus)?;
    }
    let printed = ask(compiler, "-print-prog-name=as")?;
    // A bare `as` means the driver found none of its own and will search PATH, which the
    // builder runs the job with too (it is forwarded with the job).
    let assembler = match found(&printed) {
        Some(path) => Some(path),
        None => search_path(&printed),
    };
    let assembler = assembler.with_context(|| {
        format!(
            "cannot find the assembler {printed:?} that {} runs",
            compiler.display()
        )
    })?;
    c.add_program(&assembler)?;
    // `-gsplit-dwarf` makes gcc run objcopy to move the debug sections into the .dwo.
    let printed = ask(compiler, "-print-prog-name=objcopy")?;
    if let Some(objcopy) = found(&printed).or_else(|| search_path(&printed)) {
        c.add_program(&objcopy)?;
    }
    // The linker's plugin is not run by `-c`; it is small and keeps `-flto` links possible.
    if let Some(plugin) = found(&ask(compiler, "-print-file-name=liblto_plugin.so")?) {
        c.add_program(&plugin)?;
    }
    if let Some(specs) = found(&ask(compiler, "-print-file-name=specs")?) {
        c.add_file(&specs)?;
    }
    for dir in ["include", "include-fixed"] {
        if let Some(dir) = found(&ask(compiler, &format!("-print-file-name={dir}"))?) {
            c.add_tree(&dir)?;
        }
    }
    Ok(())
}

fn clang_parts(c: &mut Collector, compiler: &Path) -> anyhow::Result<()> {
    let resource = ask(compiler, "-print-resource-dir")?;
    let resource = found(&resource).with_context(|| {
        format!(
            "{} has no resource directory (it said {resource:?})",
            compiler.display()
        )
    })?;
    c.add_tree(&resource.join("include"))?;
    // Default sanitizer ignore lists: `-fsanitize=...` fails without them. A few kilobytes.
    if resource.join("share").is_dir() {
        c.add_tree(&resource.join("share"))?;
    }
    // clang takes a directory for a GCC installation only if it holds `crtbegin.o`, and finds
    // libstdc++'s headers through the installation it selects.
    let out = process::probe(compiler, &["-v".to_owned()])
        .with_context(|| format!("cannot run {} -v", compiler.display()))?;
    let text = String::from_utf8_lossy(&out.stderr);
    if let Some(gcc) = selected_gcc(&text) {
        let crtbegin = Path::new(gcc).join("crtbegin.o");
        if crtbegin.is_file() {
            c.add_file(&crtbegin)?;
        }
    }
    Ok(())
}

/// The GCC installation clang reports in `clang -v`.
fn selected_gcc(verbose: &str) -> Option<&str> {
    verbose
        .lines()
        .find_map(|l| l.strip_prefix("Selected GCC installation: "))
        .map(str::trim)
}

/// Where `execvp` would find a bare program name, when that is an absolute path (the
/// toolchain records absolute paths).
fn search_path(name: &str) -> Option<PathBuf> {
    // The compiler inherits this process's environment, so it searches this PATH.
    crate::env::Env::capture().find_program(name, |p, _| p.is_absolute())
}

/// Directories whose contents are shipped per job, never in a toolchain: a link from the
/// compiler's own files into them is kept as a link but not followed.
const SYSTEM_HEADERS: &[&str] = &["/usr/include", "/usr/local/include"];

/// Builds a manifest from host paths.
#[derive(Debug, Default)]
struct Collector {
    manifest: Manifest,
    /// Real paths of programs whose libraries are listed already.
    linked: BTreeSet<PathBuf>,
    /// Real directories already walked, so a link loop walks nothing twice.
    walked: BTreeSet<PathBuf>,
}

/// One step of a path being resolved.
#[derive(Debug)]
enum Step {
    Up,
    Down(OsString),
}

/// The steps of `path` after its root, in reverse, so that `pop` yields the first.
fn steps_rev(path: &Path) -> Vec<Step> {
    let mut steps: Vec<Step> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(Step::Down(name.to_os_string())),
            Component::ParentDir => Some(Step::Up),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    steps.reverse();
    steps
}

/// The archive path of a real absolute path: the same without the leading `/`.
fn rel(path: &Path) -> PathBuf {
    path.strip_prefix("/").unwrap_or(path).to_path_buf()
}

impl Collector {
    /// Resolves the absolute `path` one component at a time and returns its real path, adding
    /// each symlink met on the way as a symlink entry. The resolved prefix never holds a link,
    /// so `..` after it is its lexical parent, as the kernel would find it.
    fn resolve(&mut self, path: &Path) -> anyhow::Result<PathBuf> {
        if !path.is_absolute() {
            bail!("{} is not an absolute path", path.display());
        }
        let mut real = PathBuf::from("/");
        let mut pending = steps_rev(path);
        let mut hops = 0;
        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Up => {
                    real.pop();
                    continue;
                }
                Step::Down(name) => name,
            };
            let next = real.join(&name);
            let meta = fs::symlink_metadata(&next).with_context(|| {
                format!(
                    "cannot resolve {}: {} is missing",
                    path.display(),
                    next.display()
                )
            })?;
            if !meta.file_type().is_symlink() {
                real = next;
                continue;
            }
            hops += 1;
            if hops > 40 {
                bail!(
                    "cannot resolve {}: too many levels of symbolic links",
                    path.display()
                );
            }
            let target = fs::read_link(&next)
                .with_context(|| format!("cannot read the link {}", next.display()))?;
            self.manifest
                .add(rel(&next), Source::Symlink(relative_target(&real, &target)));
            if target.is_absolute() {
                real = PathBuf::from("/");
            }
            pending.extend(steps_rev(&target));
        }
        Ok(real)
    }

    /// Adds the regular file at `path` (and the links leading to it); returns its real path.
    fn add_file(&mut self, path: &Path) -> anyhow::Result<PathBuf> {
        let real = self.resolve(path)?;
        let meta =
            fs::metadata(&real).with_context(|| format!("cannot stat {}", real.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", real.display());
        }
        self.manifest.add(
            rel(&real),
            Source::File {
                executable: meta.permissions().mode() & 0o111 != 0,
                host: real.clone(),
            },
        );
        Ok(real)
    }

    /// Adds a program and the shared libraries it loads, the dynamic loader included.
    fn add_program(&mut self, path: &Path) -> anyhow::Result<()> {
        let real = self.add_file(path)?;
        if !self.linked.insert(real.clone()) {
            return Ok(());
        }
        for lib in libraries(&real)? {
            // `ldd` lists the whole closure, so the libraries need no `ldd` of their own.
            self.add_file(&lib)
                .with_context(|| format!("a library of {}", real.display()))?;
        }
        Ok(())
    }

    /// Adds the directory at `path` with everything below it, following links.
    fn add_tree(&mut self, path: &Path) -> anyhow::Result<()> {
        let real = self.resolve(path)?;
        if !self.walked.insert(real.clone()) {
            return Ok(());
        }
        self.manifest.add(rel(&real), Source::Dir);
        let entries =
            fs::read_dir(&real).with_context(|| format!("cannot list {}", real.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", real.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if kind.is_dir() {
                self.add_tree(&path)?;
            } else if kind.is_file() {
                self.add_file(&path)?;
            } else if kind.is_symlink() {
                // Records the link (and any on the way to its target).
                let Ok(target) = self.resolve(&path) else {
                    continue; // dangling: the link alone is all there is to copy
                };
                if SYSTEM_HEADERS.iter().any(|dir| target.starts_with(dir)) {
                    continue;
                }
                if target.is_dir() {
                    self.add_tree(&target)?;
                } else if target.is_file() {
                    self.add_file(&target)?;
                }
            }
            // Sockets, FIFOs and devices have no place in a toolchain.
        }
        Ok(())
    }
}

/// The target of a link in the real directory `dir`, made relative to `dir` with the same
/// meaning: an absolute target climbs to the root first, and `..` that would climb above the
/// root is dropped, as the kernel stops there. `dir` holds no links, so climbing it is lexical.
fn relative_target(dir: &Path, target: &Path) -> PathBuf {
    let dir: Vec<_> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut rest = target.components().peekable();
    let mut ups = dir.len();
    let mut down = 0; // components of `dir` the target walks back into
    if target.is_absolute() {
        rest.next();
        // `/..` is `/`.
        while rest.next_if_eq(&Component::ParentDir).is_some() {}
        while down < dir.len() && rest.peek() == Some(&Component::Normal(dir[down])) {
            rest.next();
            down += 1;
        }
        ups -= down;
    } else {
        // Leading `..` climb `dir`; keep as many as it has.
        let mut climbs = 0;
        while rest.next_if_eq(&Component::ParentDir).is_some() {
            climbs += 1;
        }
        ups = climbs.min(dir.len());
    }
    let mut out = PathBuf::new();
    for _ in 0..ups {
        out.push("..");
    }
    for c in rest {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The shared libraries `program` loads, as `ldd` resolves them (the loader included). A
/// statically linked program has none.
fn libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let arg = program
        .to_str()
        .with_context(|| format!("{} is not a UTF-8 path", program.display()))?;
    // Only ELF files have libraries; ldd on anything else (a script driver) just fails.
    let mut magic = [0u8; 4];
    let is_elf = fs::File::open(program)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if !is_elf {
        return Ok(Vec::new());
    }
    // `ldd` runs the dynamic loader on the program; it is what peers do, and the program is one
    // this machine runs for every compile anyway.
    let out = process::capture(Path::new("ldd"), &[arg.to_owned()], None)
        .context("cannot run ldd, which lists the libraries a compiler loads")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {arg} failed: {}", stderr.trim());
    }
    parse_ldd(&stdout).map_err(|missing| {
        anyhow::anyhow!(
            "{arg} needs libraries that cannot be found: {}",
            missing.join(", ")
        )
    })
}

/// The paths in `ldd` output, or the names it could not find.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, Vec<String>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `name => /path (0x...)`, `name => not found`, `/lib64/ld-linux... (0x...)`,
        // `linux-vdso.so.1 (0x...)`, `statically linked`.
        let (name, place) = match line.split_once(" => ") {
            Some((name, place)) => (name, place),
            None => (line, line),
        };
        if place.trim() == "not found" {
            missing.push(name.to_owned());
            continue;
        }
        let path = place.split(" (0x").next().unwrap_or("").trim();
        if path.starts_with('/') {
            found.push(PathBuf::from(path));
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(missing)
    }
}

/// Checks what the unpacker will check, so a strange host tree fails here, with its name,
/// rather than on every builder: relative normal paths, symlinks that stay inside, and no
/// entry below a symlink or a file.
fn check(manifest: &Manifest) -> anyhow::Result<()> {
    for (path, source) in &manifest.entries {
        if path.as_os_str().is_empty()
            || !path.components().all(|c| matches!(c, Component::Normal(_)))
        {
            bail!(
                "toolchain entry {} is not a plain relative path",
                path.display()
            );
        }
        for parent in path.ancestors().skip(1) {
            match manifest.entries.get(parent) {
                None | Some(Source::Dir) => {}
                Some(_) => bail!(
                    "toolchain entry {} lies below {}, which is not a directory",
                    path.display(),
                    parent.display()
                ),
            }
        }
        if let Source::Symlink(target) = source {
            if !link_stays_inside(path, target) {
                bail!(
                    "toolchain link {} -> {} leaves the archive",
                    path.display(),
                    target.display()
                );
            }
        }
    }
    Ok(())
}

// The tests run real compilers and tools directly.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use kiln_archive::{unpack, Limits};
    use std::os::unix::fs::symlink;
    use std::process::Command;

    #[test]
    fn link_targets_become_relative() {
        let cases = [
            // (directory of the link, target, stored target)
            ("/usr/bin", "gcc-12", "gcc-12"),
            ("/usr/bin", "/usr/bin/gcc-12", "gcc-12"),
            (
                "/usr/bin",
                "../lib/llvm-14/bin/clang",
                "../lib/llvm-14/bin/clang",
            ),
            ("/etc/alternatives", "/usr/bin/gcc", "../../usr/bin/gcc"),
            (
                "/usr/bin",
                "/etc/alternatives/cc",
                "../../etc/alternatives/cc",
            ),
            ("/", "usr/lib", "usr/lib"),
            ("/", "/usr/lib", "usr/lib"),
            (
                "/usr/lib64",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "../../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
            ("/usr/bin", "/usr/bin", "."),
            ("/usr/bin", ".", "."),
            ("/usr/bin", "/usr", ".."),
            ("/usr/bin", "/", "../.."),
            // The kernel stops at the root.
            ("/usr/bin", "../../../../x", "../../x"),
            ("/usr/bin", "/../../x", "../../x"),
            // After a component that may be a link, `..` keeps its meaning only verbatim.
            ("/a", "/a/b/../c", "b/../c"),
            ("/a", "b/../c", "b/../c"),
        ];
        for (dir, target, want) in cases {
            let got = relative_target(Path::new(dir), Path::new(target));
            assert_eq!(got, Path::new(want), "{dir} + {target}");
            let link = rel(&Path::new(dir).join("link"));
            assert!(
                link_stays_inside(&link, &got),
                "{dir} + {target} -> {got:?}"
            );
        }
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibLLVM-14.so.1 => /lib/x86_64-linux-gnu/libLLVM-14.so.1 (0x00007fab)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007fab3537b000)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libLLVM-14.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").unwrap(),
            Vec::<PathBuf>::new()
        );
        let missing = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(parse_ldd(missing).unwrap_err(), ["libfoo.so.1"]);
    }

    #[test]
    fn clang_gcc_installation_is_read() {
        let text = "Found candidate GCC installation: /usr/bin/../lib/gcc/x86_64-linux-gnu/12\n\
                    Selected GCC installation: /usr/bin/../lib/gcc/x86_64-linux-gnu/12\n";
        assert_eq!(
            selected_gcc(text),
            Some("/usr/bin/../lib/gcc/x86_64-linux-gnu/12")
        );
        assert_eq!(selected_gcc("clang version 14\n"), None);
    }

    /// Links of every kind, followed into an archive that unpacks and reads back the same.
    #[test]
    fn links_are_recorded_relative_and_files_stored_at_real_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().canonicalize().unwrap();
        fs::create_dir_all(t.join("real/dir/sub")).unwrap();
        fs::write(t.join("real/dir/file.txt"), "hello").unwrap();
        fs::write(t.join("real/dir/sub/inner.txt"), "inner").unwrap();
        symlink("real/dir", t.join("dirlink")).unwrap();
        symlink(t.join("real/dir/file.txt"), t.join("abs")).unwrap();
        symlink("abs", t.join("chain")).unwrap();
        symlink("../file.txt", t.join("real/dir/sub/up")).unwrap();
        symlink(".", t.join("real/dir/loop")).unwrap();
        symlink("missing", t.join("real/dir/dangling")).unwrap();

        let mut c = Collector::default();
        c.add_file(&t.join("chain")).unwrap();
        c.add_file(&t.join("dirlink/sub/inner.txt")).unwrap();
        c.add_tree(&t.join("dirlink")).unwrap();
        check(&c.manifest).unwrap();
        let at = |p: &str| c.manifest.entries.get(&rel(&t.join(p))).cloned();
        assert_eq!(at("dirlink"), Some(Source::Symlink("real/dir".into())));
        // An absolute target, made relative to the link's directory.
        assert_eq!(at("abs"), Some(Source::Symlink("real/dir/file.txt".into())));
        assert_eq!(at("real/dir/loop"), Some(Source::Symlink(".".into())));
        assert_eq!(
            at("real/dir/dangling"),
            Some(Source::Symlink("missing".into()))
        );
        assert!(matches!(
            at("real/dir/sub/inner.txt"),
            Some(Source::File { .. })
        ));
        // Nothing is stored below a link.
        assert_eq!(at("dirlink/sub/inner.txt"), None);

        let mut bytes = Vec::new();
        c.manifest.pack(&mut bytes).unwrap();
        let root = t.join("unpacked");
        unpack(&bytes[..], &root, &Limits::default()).unwrap();
        let inside = |p: &str| fs::read_to_string(root.join(rel(&t.join(p)))).unwrap();
        assert_eq!(inside("chain"), "hello");
        assert_eq!(inside("dirlink/sub/inner.txt"), "inner");
        assert_eq!(inside("dirlink/sub/up"), "hello");
        assert_eq!(inside("real/dir/loop/loop/file.txt"), "hello");
    }

    /// The compiler called `name` in PATH, if installed.
    const COMPILERS: [&str; 4] = ["gcc", "g++", "clang", "clang++"];

    /// Follows `path` through the manifest's own entries, as the kernel would in the unpacked
    /// tree, to the file entry it names.
    fn follow(m: &Manifest, path: &Path) -> Option<PathBuf> {
        let mut at = PathBuf::new();
        let mut pending = steps_rev(path);
        let mut hops = 0;
        while let Some(step) = pending.pop() {
            match step {
                Step::Up => {
                    at.pop();
                }
                Step::Down(name) => {
                    let next = at.join(name);
                    match m.entries.get(&next) {
                        Some(Source::Symlink(target)) => {
                            assert!(target.is_relative(), "{next:?} -> {target:?}");
                            hops += 1;
                            assert!(hops < 40, "link loop at {next:?}");
                            pending.extend(steps_rev(target));
                        }
                        Some(Source::File { .. }) if pending.is_empty() => at = next,
                        Some(Source::File { .. }) => return None,
                        // Directories may be implicit: the unpacker makes parents.
                        Some(Source::Dir) | None => at = next,
                    }
                }
            }
        }
        matches!(m.entries.get(&at), Some(Source::File { .. })).then_some(at)
    }

    #[test]
    fn manifests_hold_only_relative_links_and_no_system_headers() {
        for name in COMPILERS {
            let compiler = crate::testing::require(name);
            let m = manifest(&compiler).unwrap();
            for (path, source) in &m.entries {
                assert!(
                    path.components().all(|c| matches!(c, Component::Normal(_))),
                    "{name}: {path:?}"
                );
                for parent in path.ancestors().skip(1) {
                    assert!(
                        matches!(m.entries.get(parent), None | Some(Source::Dir)),
                        "{name}: {path:?} lies below {parent:?}, which is not a directory"
                    );
                }
                if let Source::Symlink(target) = source {
                    assert!(target.is_relative(), "{name}: {path:?} -> {target:?}");
                    assert!(
                        link_stays_inside(path, target),
                        "{name}: {path:?} -> {target:?}"
                    );
                }
                for outside in ["usr/include", "usr/local/include", "tmp"] {
                    assert!(!path.starts_with(outside), "{name}: {path:?}");
                }
            }
            // The driver as the user names it and the loader named in every program.
            for needed in [compiler.as_path(), Path::new("/lib64/ld-linux-x86-64.so.2")] {
                assert!(
                    follow(&m, needed).is_some(),
                    "{name}: {} does not lead to a file of the archive",
                    needed.display()
                );
            }
            let version = ask(&compiler, "--version").unwrap();
            if !version.contains("clang") {
                let cc1 = ask(&compiler, "-print-prog-name=cc1").unwrap();
                assert!(follow(&m, Path::new(&cc1)).is_some(), "{name}: {cc1}");
                let stddef = ask(&compiler, "-print-file-name=include").unwrap() + "/stddef.h";
                assert!(follow(&m, Path::new(&stddef)).is_some(), "{name}: {stddef}");
                let assembler = search_path("as").unwrap();
                assert!(follow(&m, &assembler).is_some(), "{name}: as");
            } else {
                let resource = ask(&compiler, "-print-resource-dir").unwrap();
                let stddef = resource + "/include/stddef.h";
                assert!(follow(&m, Path::new(&stddef)).is_some(), "{name}: {stddef}");
            }
        }
    }

    /// Runs `program` with `root` as `/`. As root this is chroot(8); otherwise a user namespace
    /// maps us to root first.
    fn jailed(root: &Path, program: &Path) -> Command {
        let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
        let mut cmd = if uid == 0 {
            Command::new("chroot")
        } else {
            let mut c = Command::new("unshare");
            c.args(["--map-root-user", "chroot"]);
            c
        };
        cmd.arg(root).arg(program).env("TMPDIR", "/tmp");
        cmd
    }

    fn run_ok(mut cmd: Command, what: &str) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packs `name`, unpacks it as a builder would, adds the job's inputs at their own paths and
    /// compiles in a chroot: the outputs must be the host's, byte for byte.
    fn compiles_in_a_chroot_as_on_the_host(name: &str) {
        let compiler = crate::testing::require(name);
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path().canonicalize().unwrap();
        let cxx = name.ends_with("++");
        let ext = if cxx { "cc" } else { "c" };
        let src = w.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(
            src.join("kiln_tc.h"),
            "static inline int twice(int x) { return 2 * x; }\n",
        )
        .unwrap();
        // One source with no system header, one with some.
        let plain = src.join(format!("plain.{ext}"));
        fs::write(
            &plain,
            "#include \"kiln_tc.h\"\nint f(int x) { return twice(x) + 1; }\n",
        )
        .unwrap();
        let system = src.join(format!("system.{ext}"));
        let system_text = if cxx {
            "#include <vector>\n#include \"kiln_tc.h\"\n\
             int sum(int n) { std::vector<int> v; for (int i = 0; i < n; ++i) v.push_back(twice(i));\n\
             int s = 0; for (int x : v) s += x; return s; }\n"
        } else {
            "#include <stdio.h>\n#include \"kiln_tc.h\"\n\
             int main(void) { printf(\"%d\\n\", twice(21)); return 0; }\n"
        };
        fs::write(&system, system_text).unwrap();

        let archive = w.join("toolchain.tar.gz");
        let t = package(&compiler, &archive).unwrap();
        assert_eq!(t.digest, Digest::of(&fs::read(&archive).unwrap()));
        assert_eq!(t.size, fs::metadata(&archive).unwrap().len());
        let root = w.join("root");
        unpack(fs::File::open(&archive).unwrap(), &root, &Limits::default()).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();

        // The job's inputs: the sources, and the system headers as the host compiler finds
        // them (its own private headers are in the toolchain already).
        let inputs = root.join(rel(&src));
        fs::create_dir_all(&inputs).unwrap();
        for f in fs::read_dir(&src).unwrap() {
            let f = f.unwrap();
            fs::copy(f.path(), inputs.join(f.file_name())).unwrap();
        }
        // With the flags of the compiles below: `-O2` includes more of glibc's headers.
        let deps = Command::new(&compiler)
            .args(["-O2", "-M"])
            .arg(&system)
            .current_dir("/")
            .output()
            .unwrap();
        assert!(deps.status.success(), "{name} -M: {deps:?}");
        let deps = String::from_utf8_lossy(&deps.stdout).into_owned();
        for dep in deps.split_whitespace().filter(|d| d.starts_with('/')) {
            let real = fs::canonicalize(dep).unwrap();
            let copy = root.join(rel(&real));
            if !copy.exists() {
                fs::create_dir_all(copy.parent().unwrap()).unwrap();
                fs::copy(&real, &copy).unwrap();
            }
        }

        let out = w.join("out");
        fs::create_dir_all(&out).unwrap();
        fs::create_dir_all(root.join(rel(&out))).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let o = |f: &str| out.join(f);
        let cases: [(Vec<String>, Vec<PathBuf>); 3] = [
            (
                vec![
                    "-c".into(),
                    "-g".into(),
                    "-O2".into(),
                    s(&plain),
                    "-o".into(),
                    s(&o("plain.o")),
                ],
                vec![o("plain.o")],
            ),
            (
                vec![
                    "-c".into(),
                    "-g".into(),
                    "-O2".into(),
                    "-MD".into(),
                    "-MF".into(),
                    s(&o("system.d")),
                    s(&system),
                    "-o".into(),
                    s(&o("system.o")),
                ],
                vec![o("system.o"), o("system.d")],
            ),
            (
                vec![
                    "-S".into(),
                    "-O2".into(),
                    s(&plain),
                    "-o".into(),
                    s(&o("plain.s")),
                ],
                vec![o("plain.s")],
            ),
        ];
        for (args, outputs) in cases {
            // The jail starts in `/`; so does the host compile, as the working directory is
            // in the debug information.
            let mut host = Command::new(&compiler);
            host.args(&args).current_dir("/");
            run_ok(host, &format!("{name} {args:?} on the host"));
            let mut jail = jailed(&root, &compiler);
            jail.args(&args);
            run_ok(jail, &format!("{name} {args:?} in the chroot"));
            for file in outputs {
                let want = fs::read(&file).unwrap();
                let got = fs::read(root.join(rel(&file))).unwrap();
                assert!(
                    want == got,
                    "{name} {args:?}: {} differs ({} bytes on the host, {} in the chroot)",
                    file.display(),
                    want.len(),
                    got.len()
                );
            }
        }
    }

    #[test]
    fn gcc_compiles_in_a_chroot_as_on_the_host() {
        compiles_in_a_chroot_as_on_the_host("gcc");
    }

    #[test]
    fn gxx_compiles_in_a_chroot_as_on_the_host() {
        compiles_in_a_chroot_as_on_the_host("g++");
    }

    #[test]
    fn clang_compiles_in_a_chroot_as_on_the_host() {
        compiles_in_a_chroot_as_on_the_host("clang");
    }

    #[test]
    fn clangxx_compiles_in_a_chroot_as_on_the_host() {
        compiles_in_a_chroot_as_on_the_host("clang++");
    }

    /// The cheapest compiler to pack.
    fn any_compiler() -> PathBuf {
        crate::testing::require(COMPILERS[0])
    }

    #[test]
    fn packing_twice_gives_the_same_bytes() {
        let compiler = any_compiler();
        let tmp = tempfile::tempdir().unwrap();
        let a = package(&compiler, &tmp.path().join("a.tar.gz")).unwrap();
        let b = package(&compiler, &tmp.path().join("b.tar.gz")).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.size, b.size);
        assert!(fs::read(&a.archive).unwrap() == fs::read(&b.archive).unwrap());
    }

    #[test]
    fn ensure_packs_once_per_compiler_name() {
        let compiler = any_compiler();
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path();
        let identity = crate::compiler::identify(&compiler, cache)
            .unwrap()
            .digest();

        // Several processes' first remote compiles at once: one packs, the others are told.
        let results: Vec<_> = std::thread::scope(|s| {
            let asks: Vec<_> = (0..3)
                .map(|_| s.spawn(|| ensure(cache, &compiler, &identity, false)))
                .collect();
            asks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let first = ensure(cache, &compiler, &identity, false).unwrap();
        assert_eq!(first.digest, Digest::of(&fs::read(&first.archive).unwrap()));
        assert_eq!(first.size, fs::metadata(&first.archive).unwrap().len());
        assert!(first.archive.starts_with(cache.join("toolchains")));
        for r in &results {
            match r {
                Ok(t) => assert_eq!(t, &first),
                Err(e) => assert!(format!("{e:#}").contains("being packaged"), "{e:#}"),
            }
        }
        assert!(results.iter().any(Result::is_ok));
        let leftovers: Vec<_> = fs::read_dir(cache.join("toolchains"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".tar.gz") && !n.ends_with(".json"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Asked again, nothing is packed: the same file, untouched.
        let stat = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (m.ino(), mtime_ns(&m))
        };
        let before = stat(&first.archive);
        let again = ensure(cache, &compiler, &identity, false).unwrap();
        assert_eq!(again, first);
        assert_eq!(stat(&again.archive), before);

        // A damaged archive is packed again, to the same bytes.
        let mut damaged = fs::read(&first.archive).unwrap();
        damaged.push(0);
        fs::write(&first.archive, damaged).unwrap();
        let repacked = ensure(cache, &compiler, &identity, false).unwrap();
        assert_eq!(repacked, first);
        assert_eq!(
            repacked.digest,
            Digest::of(&fs::read(&repacked.archive).unwrap())
        );

        // Another name for the same binary (so the same identity) needs its own archive, which
        // holds that name: the builder runs the command as the user typed it.
        let tmp = tempfile::tempdir().unwrap();
        let alias = tmp.path().canonicalize().unwrap().join("cc-alias");
        symlink(&compiler, &alias).unwrap();
        let other = ensure(cache, &alias, &identity, false).unwrap();
        assert_ne!(other.archive, first.archive);
        assert_eq!(other.digest, Digest::of(&fs::read(&other.archive).unwrap()));
        let root = tmp.path().join("root");
        unpack(
            fs::File::open(&other.archive).unwrap(),
            &root,
            &Limits::default(),
        )
        .unwrap();
        let link = fs::symlink_metadata(root.join(rel(&alias))).unwrap();
        assert!(link.file_type().is_symlink());
    }
}
