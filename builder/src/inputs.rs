//! Input files (sources and headers) kept by digest, so a header crosses the network once per
//! builder.
//!
//! They are plain files ([`Kind::Raw`]) rather than framed store entries, so that a job's inputs
//! can be hard links to them instead of copies: placing 400 headers is then 400 `link` calls.
//! Links are safe to hand to a job because they are its overlay's lower layer: a job that
//! writes one gets a copy in its own layer, and the file here is owned by root and never
//! written again.
//!
//! A file is verified against its digest when it arrives, and again the first time this
//! process uses it after that (it may have been damaged on disk since an earlier run); after
//! that it is trusted while it is the same file (device, inode, length, modification time; not
//! the change time, which every hard link to the file moves). A file that fails is removed,
//! and the job asks for it again.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kiln_cache::{Kind, Store, StoreError};
use kiln_proto::Digest;

/// How many verified files are remembered.
const REMEMBERED: usize = 1 << 18;
/// A file used more recently than this is not touched again (eviction is by modification time).
const TOUCH_AFTER: Duration = Duration::from_secs(600);

/// What identifies a file on disk, checked before trusting an earlier verification: a file
/// written again, or replaced by another that reuses the inode, has a new modification time.
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(meta: &fs::Metadata) -> Stamp {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

pub(crate) struct Inputs {
    store: Store,
    verified: Mutex<lru::LruCache<Digest, Stamp>>,
}

impl Inputs {
    pub fn open(dir: PathBuf, max_size: u64) -> Inputs {
        let store = Store::open(
            dir,
            kiln_cache::Limits {
                max_size,
                max_files: 0,
            },
        );
        Inputs {
            store,
            verified: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(REMEMBERED).expect("a nonzero constant"),
            )),
        }
    }

    /// Where the file for `digest` is (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.store.path_of(Kind::Raw, digest)
    }

    fn remember(&self, digest: Digest, meta: &fs::Metadata) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(digest, stamp(meta));
    }

    /// Whether a good copy of `digest` is here. Blocks: it may read and hash the file.
    pub fn have(&self, digest: &Digest) -> bool {
        let path = self.path(digest);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return false;
        };
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .copied();
        if known == Some(stamp(&meta)) {
            self.touch(digest, &path, &meta);
            return true;
        }
        let good = meta.is_file()
            && fs::File::open(&path)
                .and_then(|f| {
                    let mut data = Vec::with_capacity(meta.len() as usize);
                    f.take(meta.len() + 1).read_to_end(&mut data)?;
                    Ok(Digest::of(&data) == *digest)
                })
                .unwrap_or(false);
        if good {
            self.remember(*digest, &meta);
            self.touch(digest, &path, &meta);
        } else {
            tracing::warn!(path = %path.display(), "removing a damaged input file");
            let _ = self.store.remove(Kind::Raw, digest);
        }
        good
    }

    /// Keeps `data`, already verified to be `digest`.
    pub fn keep(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
        // A file already there of the same length is kept as it is: another job of this
        // process wrote it from verified data (`have` removed any damaged one before).
        let path = self.store.put_raw(digest, data)?;
        if let Ok(meta) = fs::symlink_metadata(&path) {
            self.remember(*digest, &meta);
        }
        Ok(())
    }
}

fn fresh(t: SystemTime) -> bool {
    t.elapsed().unwrap_or_default() < TOUCH_AFTER
}

impl Inputs {
    /// Marks a file used, for eviction, at most once per [`TOUCH_AFTER`]; the touch moves its
    /// modification time, so the verification is remembered again.
    fn touch(&self, digest: &Digest, path: &std::path::Path, meta: &fs::Metadata) {
        if meta.modified().is_ok_and(fresh) {
            return;
        }
        let Ok(f) = fs::File::open(path) else {
            return;
        };
        // Best effort: a failed touch only makes the file look older to eviction.
        if f.set_modified(SystemTime::now()).is_ok() {
            if let Ok(now) = f.metadata() {
                self.remember(*digest, &now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_verified_once_and_damage_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = Inputs::open(dir.path().join("in"), 1 << 30);
        let data = b"#define X 1\n";
        let d = Digest::of(data);
        assert!(!inputs.have(&d));
        inputs.keep(&d, data).unwrap();
        assert!(inputs.have(&d));
        assert_eq!(fs::read(inputs.path(&d)).unwrap(), data);

        // A file replaced on disk is checked again, and a wrong one removed. (ext4 hands the
        // freed inode straight to the new file: only the modification time tells them apart,
        // once the kernel's coarse clock has ticked.)
        let path = inputs.path(&d);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"#define X 2\n").unwrap();
        assert!(!inputs.have(&d), "a damaged input was trusted");
        assert!(!path.exists(), "a damaged input was kept");

        // A new process (an empty memory) verifies what an earlier one left.
        inputs.keep(&d, data).unwrap();
        let again = Inputs::open(dir.path().join("in"), 1 << 30);
        assert!(again.have(&d));
    }
}
