//! The builder's toolchain cache: verified archives on disk, least recently used out first
//! when over budget, and never one a job is using.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_proto::Digest;

#[derive(Debug)]
pub struct ToolchainCache {
    dir: PathBuf,
    lru: lru::LruCache<Digest, u64>,
    bytes: u64,
    budget: u64,
    pins: HashMap<Digest, usize>,
}

impl ToolchainCache {
    /// Opens the cache in `dir`, keeping the archives an earlier run left that still match their
    /// names; anything else there is removed.
    pub fn open(dir: &Path, budget: u64) -> anyhow::Result<ToolchainCache> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name
                .strip_suffix(".tar.gz")
                .and_then(|hex| hex.parse::<Digest>().ok());
            match digest {
                Some(d) if digest_of_file(&path).ok() == Some(d) => {
                    let modified = entry.metadata().and_then(|m| m.modified()).ok();
                    found.push((modified, d, entry.metadata().map(|m| m.len()).unwrap_or(0)));
                }
                _ => {
                    tracing::info!(path = %path.display(), "removing a stale or damaged toolchain");
                    let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
                }
            }
        }
        found.sort();
        let mut cache = ToolchainCache {
            dir: dir.to_path_buf(),
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
            pins: HashMap::new(),
        };
        for (_, d, size) in found {
            cache.bytes += size;
            cache.lru.put(d, size);
        }
        Ok(cache)
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.tar.gz", digest.to_hex()))
    }

    pub fn held(&self) -> Vec<(Digest, u64)> {
        self.lru.iter().map(|(d, s)| (*d, *s)).collect()
    }

    /// Whether the archive is here; counts as a use.
    pub fn touch(&mut self, digest: &Digest) -> bool {
        self.lru.get(digest).is_some()
    }

    pub fn pin(&mut self, digest: Digest) {
        *self.pins.entry(digest).or_default() += 1;
    }

    pub fn unpin(&mut self, digest: &Digest) {
        if let Some(n) = self.pins.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(digest);
            }
        }
    }

    /// Stores a verified archive; returns the digests evicted to make room.
    pub fn insert(&mut self, digest: Digest, data: &[u8]) -> anyhow::Result<Vec<Digest>> {
        let path = self.path(&digest);
        kiln_cache::write_atomically(&path, data)?;
        if self.lru.put(digest, data.len() as u64).is_none() {
            self.bytes += data.len() as u64;
        }
        let mut evicted = Vec::new();
        let mut skipped = Vec::new();
        while self.bytes > self.budget {
            let Some((old, size)) = self.lru.pop_lru() else {
                break;
            };
            if old == digest || self.pins.contains_key(&old) {
                skipped.push((old, size));
                continue;
            }
            self.bytes -= size;
            let _ = fs::remove_file(self.path(&old));
            evicted.push(old);
        }
        // Pinned ones go back as the most recent: they are in use right now.
        for (d, size) in skipped {
            self.lru.put(d, size);
        }
        Ok(evicted)
    }
}

fn digest_of_file(path: &Path) -> std::io::Result<Digest> {
    let mut hasher = blake3::Hasher::new();
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(*hasher.finalize().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_but_never_pinned_and_reopens_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ToolchainCache::open(dir.path(), 10).unwrap();
        let (a, b, d) = (vec![1u8; 4], vec![2u8; 4], vec![3u8; 4]);
        let (da, db, dd) = (Digest::of(&a), Digest::of(&b), Digest::of(&d));
        assert!(c.insert(da, &a).unwrap().is_empty());
        assert!(c.insert(db, &b).unwrap().is_empty());
        c.pin(da);
        assert_eq!(
            c.insert(dd, &d).unwrap(),
            vec![db],
            "the pinned one was evicted"
        );
        assert!(c.touch(&da) && c.touch(&dd) && !c.touch(&db));
        assert!(!c.path(&db).exists());

        // A damaged archive is dropped on the next start.
        fs::write(c.path(&dd), b"damaged").unwrap();
        let c = ToolchainCache::open(dir.path(), 10).unwrap();
        let held: Vec<Digest> = c.held().into_iter().map(|(d, _)| d).collect();
        assert_eq!(held, vec![da]);
    }
}
