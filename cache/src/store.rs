//! The store on disk: `DIR/<k0>/<k1>/<rest-of-key><kind>`, sixteen shards by the key's first
//! hex digit, each with its own size counters (`DIR/<k0>/stats`) and its own cleanup lock.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::entry::{self, EntryError, Kind};
use crate::{Counters, Digest};

const SHARDS: u64 = 16;
const TMP_PREFIX: &str = ".tmp.";
/// Temporary files older than this belong to a dead writer and are swept by cleanup.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Reads refresh an entry's mtime (its LRU position) at most this often, to save a syscall
/// on the hit path.
const TOUCH_GRANULARITY: Duration = Duration::from_secs(600);
/// Cleanup brings a shard down to this fraction of its share of the limits, so a full cache
/// does not clean on every write.
const CLEANUP_TARGET: f64 = 0.9;

/// Size and count limits for the whole store; each shard keeps 1/16th.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes on disk, entries and manifests included. Zero means no limit.
    pub max_size: u64,
    /// Number of entries. Zero means no limit.
    pub max_files: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_size: 10 << 30,
            max_files: 0,
        }
    }
}

/// Parses a size: plain bytes, or a number with K, M, G or T (powers of 1024), optionally
/// followed by `B` or `iB`: `10G`, `1.5GiB`, `500M`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult as f64) as u64),
        _ => Err(format!(
            "{text:?} is not a size (examples: 10G, 500M, 1.5GiB, 4096)"
        )),
    }
}

/// A failure of the store's own I/O (a corrupt entry is not an error: it is a miss).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read cache entry {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write cache entry {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot update cache counters {path}: {source}")]
    Counters { path: PathBuf, source: io::Error },
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Entries removed to get under the limits.
    pub evicted: u64,
    /// Temporary files of dead writers removed.
    pub stale_tmp: u64,
    /// Bytes and entries left.
    pub size: u64,
    pub files: u64,
}

/// A handle on a store directory. Opening does no I/O; directories appear on first write.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    limits: Limits,
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup {
    Hit(Vec<u8>),
    Miss,
    /// The entry was damaged; it has been removed.
    Corrupt(EntryError),
}

impl Store {
    pub fn open(dir: impl Into<PathBuf>, limits: Limits) -> Store {
        Store {
            dir: dir.into(),
            limits,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry `key` of `kind` lives.
    pub fn path_of(&self, kind: Kind, key: &Digest) -> PathBuf {
        let hex = key.to_hex();
        let mut name = String::with_capacity(63);
        name.push_str(&hex[2..]);
        name.push(char::from(kind.tag()));
        self.dir.join(&hex[..1]).join(&hex[1..2]).join(name)
    }

    fn shard_dir(&self, key: &Digest) -> PathBuf {
        self.dir.join(&key.to_hex()[..1])
    }

    /// Reads and verifies an entry. A damaged entry is removed and reported as
    /// [`Lookup::Corrupt`]; the caller treats it as a miss.
    pub fn get(&self, kind: Kind, key: &Digest) -> Result<Lookup, StoreError> {
        if kind == Kind::Raw {
            // Raw files carry no frame to check: reading one here would condemn it as corrupt.
            return Ok(Lookup::Miss);
        }
        let path = self.path_of(kind, key);
        let read_err = |source| StoreError::Read {
            path: path.clone(),
            source,
        };
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) => return Err(read_err(e)),
        };
        let meta = file.metadata().map_err(read_err)?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(read_err)?;
        match entry::decode(kind, bytes) {
            Ok(payload) => {
                let now = SystemTime::now();
                let stale = meta
                    .modified()
                    .map(|m| m + TOUCH_GRANULARITY < now)
                    .unwrap_or(true);
                if stale {
                    // Best effort: a failed touch only makes the entry look older to eviction.
                    let _ = file.set_modified(now);
                }
                Ok(Lookup::Hit(payload))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "removing corrupt cache entry");
                // Only the file that was read: a writer may have renamed a good entry into place
                // since.
                use std::os::unix::fs::MetadataExt;
                let same_file = fs::symlink_metadata(&path)
                    .is_ok_and(|now| (now.dev(), now.ino()) == (meta.dev(), meta.ino()));
                if same_file && fs::remove_file(&path).is_ok() {
                    self.account(key, -(meta.len() as i64), -1)?;
                }
                Ok(Lookup::Corrupt(e))
            }
        }
    }

    /// Stores `payload` under `key`, atomically replacing any previous entry. May run a cleanup
    /// of the key's shard when it has outgrown its share of the limits.
    pub fn put(&self, kind: Kind, key: &Digest, payload: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(kind, key);
        let framed = entry::encode(kind, payload);
        let previous = fs::symlink_metadata(&path).map(|m| m.len()).ok();
        self.write(key, &path, &framed, previous)
    }

    /// Writes `bytes` atomically at `path` (which held `previous` bytes, if anything), counts
    /// the change in the key's shard, and cleans the shard when it outgrew its share.
    fn write(
        &self,
        key: &Digest,
        path: &Path,
        bytes: &[u8],
        previous: Option<u64>,
    ) -> Result<(), StoreError> {
        write_atomically(path, bytes).map_err(|source| StoreError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        let (size_delta, files_delta) = match previous {
            Some(old) => (bytes.len() as i64 - old as i64, 0),
            None => (bytes.len() as i64, 1),
        };
        let counters = self.account(key, size_delta, files_delta)?;
        if self.over_limits(&counters) {
            let shard = self.shard_dir(key);
            self.cleanup_shard(&shard)
                .map_err(|source| StoreError::Write {
                    path: shard,
                    source,
                })?;
        }
        Ok(())
    }

    /// Stores `bytes` as a plain file under `key` and returns its path. An existing file of the
    /// same length is kept as it is (content-addressed files never change, and a reader may
    /// have it open); any other is replaced atomically. The caller verifies what it reads.
    pub fn put_raw(&self, key: &Digest, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.path_of(Kind::Raw, key);
        let previous = fs::symlink_metadata(&path).map(|m| m.len()).ok();
        if previous == Some(bytes.len() as u64) {
            return Ok(path);
        }
        self.write(key, &path, bytes, previous)?;
        Ok(path)
    }

    /// Removes an entry, if present.
    pub fn remove(&self, kind: Kind, key: &Digest) -> Result<bool, StoreError> {
        let path = self.path_of(kind, key);
        let len = match fs::symlink_metadata(&path) {
            Ok(m) => m.len(),
            Err(_) => return Ok(false),
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                self.account(key, -(len as i64), -1)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Write { path, source }),
        }
    }

    fn account(&self, key: &Digest, size: i64, files: i64) -> Result<Counters, StoreError> {
        let path = self.shard_dir(key).join("stats");
        Counters::update(&path, |c| {
            c.add("size", size);
            c.add("files", files);
        })
        .map_err(|source| StoreError::Counters { path, source })
    }

    fn shard_limits(&self) -> (u64, u64) {
        (
            self.limits.max_size / SHARDS,
            self.limits.max_files / SHARDS,
        )
    }

    fn over_limits(&self, c: &Counters) -> bool {
        let (size, files) = self.shard_limits();
        (size > 0 && c.get("size") > size as i64) || (files > 0 && c.get("files") > files as i64)
    }

    /// Bytes and entries in the store, from the shard counters (cheap; exact after a cleanup).
    pub fn usage(&self) -> (u64, u64) {
        let (mut size, mut files) = (0i64, 0i64);
        for shard in 0..SHARDS {
            let path = self.dir.join(format!("{shard:x}")).join("stats");
            if let Ok(c) = Counters::read(&path) {
                size += c.get("size").max(0);
                files += c.get("files").max(0);
            }
        }
        (size as u64, files as u64)
    }

    /// Cleans every shard: sweeps dead temporary files, evicts down to the limits and
    /// recounts exactly.
    pub fn cleanup(&self) -> io::Result<CleanupReport> {
        let mut total = CleanupReport::default();
        for shard in 0..SHARDS {
            let r = self.cleanup_shard(&self.dir.join(format!("{shard:x}")))?;
            total.evicted += r.evicted;
            total.stale_tmp += r.stale_tmp;
            total.size += r.size;
            total.files += r.files;
        }
        Ok(total)
    }

    /// Removes every entry (counters are reset; other files in the directory are kept).
    pub fn clear(&self) -> io::Result<u64> {
        let mut removed = 0;
        for shard in 0..SHARDS {
            let dir = self.dir.join(format!("{shard:x}"));
            for (path, _, _) in list_shard(&dir)?.0 {
                if fs::remove_file(path).is_ok() {
                    removed += 1;
                }
            }
            set_counters(&dir, 0, 0)?;
        }
        Ok(removed)
    }

    fn cleanup_shard(&self, dir: &Path) -> io::Result<CleanupReport> {
        if !dir.exists() {
            return Ok(CleanupReport::default());
        }
        // One cleaner per shard; a second process finding the lock taken has nothing to do.
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".cleanup"))?;
        if lock.try_lock().is_err() {
            return Ok(CleanupReport::default());
        }
        let (mut entries, stale_tmp) = list_shard(dir)?;
        entries.sort_by_key(|(_, mtime, _)| *mtime);
        let mut size: u64 = entries.iter().map(|(_, _, len)| len).sum();
        let mut files = entries.len() as u64;
        let (max_size, max_files) = self.shard_limits();
        let target_size = (max_size as f64 * CLEANUP_TARGET) as u64;
        let target_files = (max_files as f64 * CLEANUP_TARGET) as u64;
        let mut evicted = 0;
        // The newest entry of a shard always stays, even alone above the shard's share: the
        // entry just written must be readable, however small the limits.
        entries.pop();
        for (path, _, len) in entries {
            let too_big = max_size > 0 && size > target_size;
            let too_many = max_files > 0 && files > target_files;
            if !too_big && !too_many {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                size -= len;
                files -= 1;
                evicted += 1;
            }
        }
        set_counters(dir, size, files)?;
        if evicted > 0 {
            tracing::debug!(shard = %dir.display(), evicted, size, files, "cleaned shard");
        }
        Ok(CleanupReport {
            evicted,
            stale_tmp,
            size,
            files,
        })
    }
}

fn set_counters(dir: &Path, size: u64, files: u64) -> io::Result<()> {
    Counters::update(&dir.join("stats"), |c| {
        c.values.insert("size".into(), size as i64);
        c.values.insert("files".into(), files as i64);
    })?;
    Ok(())
}

/// Lists a shard's entries as (path, mtime, length), removing temporary files left by dead
/// writers on the way. Returns the entries and how many temporary files were removed.
#[allow(clippy::type_complexity)]
fn list_shard(dir: &Path) -> io::Result<(Vec<(PathBuf, SystemTime, u64)>, u64)> {
    let mut entries = Vec::new();
    let mut stale = 0;
    let now = SystemTime::now();
    let subdirs = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((entries, 0)),
        Err(e) => return Err(e),
    };
    for sub in subdirs {
        let sub = sub?;
        if !sub.file_type()?.is_dir() {
            continue;
        }
        for file in fs::read_dir(sub.path())? {
            let file = file?;
            let meta = match file.metadata() {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if file.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                if mtime + STALE_TMP < now && fs::remove_file(file.path()).is_ok() {
                    stale += 1;
                }
                continue;
            }
            entries.push((file.path(), mtime, meta.len()));
        }
    }
    Ok((entries, stale))
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place, so readers see
/// the old file, or the new one whole, never a part. Creates the directory if needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via_temp(path, bytes, Replace::CreatingDir)
}

/// Replaces a build output (an object, a dependency file) with `bytes`, through a temporary
/// file and a rename as [`write_atomically`] does: the build never sees half a file. The
/// directory is not created (the compiler would not create it either), and the old file is
/// removed first: renaming over an existing file makes ext4 flush the new data to disk
/// (`auto_da_alloc`), a synchronous write on every cache hit. Readers see the old file, then
/// none, then the new one whole.
pub fn replace_output(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via_temp(path, bytes, Replace::RemovingOld)
}

/// What a temporary-file write does besides the rename.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    CreatingDir,
    RemovingOld,
}

fn write_via_temp(path: &Path, bytes: &[u8], how: Replace) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    // The prefix marks it for the store's sweep; the name says what it was for.
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}.{}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos.subsec_nanos(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
    };
    let mut file = match create() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && how == Replace::CreatingDir => {
            fs::create_dir_all(dir)?;
            create()?
        }
        Err(e) => return Err(e),
    };
    let written = file.write_all(bytes).and_then(|()| {
        if how == Replace::RemovingOld {
            let _ = fs::remove_file(path);
        }
        fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> Digest {
        Digest::of(&n.to_le_bytes())
    }

    #[test]
    fn put_get_and_kinds_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default());
        store.put(Kind::Result, &key(1), b"abc").unwrap();
        assert!(matches!(store.get(Kind::Result, &key(1)).unwrap(), Lookup::Hit(b) if b == b"abc"));
        assert!(matches!(
            store.get(Kind::Manifest, &key(1)).unwrap(),
            Lookup::Miss
        ));
        assert!(matches!(
            store.get(Kind::Result, &key(2)).unwrap(),
            Lookup::Miss
        ));
        assert_eq!(store.usage().1, 1);
    }

    #[test]
    fn corrupt_entry_is_a_miss_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default());
        store.put(Kind::Result, &key(1), b"object").unwrap();
        let path = store.path_of(Kind::Result, &key(1));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            store.get(Kind::Result, &key(1)).unwrap(),
            Lookup::Corrupt(_)
        ));
        assert!(!path.exists());
        assert!(matches!(
            store.get(Kind::Result, &key(1)).unwrap(),
            Lookup::Miss
        ));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn leftover_temp_files_are_ignored_then_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default());
        store.put(Kind::Result, &key(1), b"x").unwrap();
        let leaf = store
            .path_of(Kind::Result, &key(1))
            .parent()
            .unwrap()
            .to_path_buf();
        let tmp = leaf.join(".tmp.999.0.0");
        fs::write(&tmp, b"half an entry").unwrap();
        let old = SystemTime::now() - STALE_TMP - Duration::from_secs(5);
        File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let report = store.cleanup().unwrap();
        assert_eq!(report.stale_tmp, 1);
        assert_eq!(report.files, 1);
        assert!(!tmp.exists());
    }

    #[test]
    fn eviction_keeps_store_under_cap_and_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        // 16 KiB in all: 1 KiB per shard; entries of ~300 bytes.
        let store = Store::open(
            dir.path(),
            Limits {
                max_size: 16 * 1024,
                max_files: 0,
            },
        );
        let payload = vec![7u8; 250];
        for n in 0..400 {
            store.put(Kind::Result, &key(n), &payload).unwrap();
        }
        let report = store.cleanup().unwrap();
        assert!(report.size <= 16 * 1024, "store at {} bytes", report.size);
        let (size, _) = store.usage();
        assert!(size <= 16 * 1024);
        // The newest entry survives.
        assert!(matches!(
            store.get(Kind::Result, &key(399)).unwrap(),
            Lookup::Hit(_)
        ));
    }

    #[test]
    fn raw_files_are_plain_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default());
        let path = store.put_raw(&key(1), b"body").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"body");
        assert_eq!(path, store.path_of(Kind::Raw, &key(1)));
        assert!(path.extension().is_none());
        // Written once: the same content again leaves the file alone.
        let before = fs::metadata(&path).unwrap().modified().unwrap();
        store.put_raw(&key(1), b"body").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);
        assert_eq!(store.usage(), (4, 1));
        assert!(store.remove(Kind::Raw, &key(1)).unwrap());
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn count_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            Limits {
                max_size: 0,
                max_files: 32,
            },
        );
        for n in 0..200 {
            store.put(Kind::Blob, &key(n), b"b").unwrap();
        }
        assert!(store.cleanup().unwrap().files <= 32);
    }

    #[test]
    fn replacing_an_entry_keeps_counts_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default());
        store.put(Kind::Result, &key(1), b"one").unwrap();
        store.put(Kind::Result, &key(1), b"three").unwrap();
        let (size, files) = store.usage();
        assert_eq!(files, 1);
        assert_eq!(size, (entry::HEADER_LEN + 5) as u64);
        assert!(store.remove(Kind::Result, &key(1)).unwrap());
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn an_output_is_replaced_whole_and_its_directory_is_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.o");
        std::fs::write(&out, b"old").unwrap();
        replace_output(&out, b"new").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        let missing = dir.path().join("nodir").join("a.o");
        assert!(replace_output(&missing, b"x").is_err());
        assert!(!missing.parent().unwrap().exists());
        write_atomically(&missing, b"x").unwrap();
        assert_eq!(std::fs::read(&missing).unwrap(), b"x");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
