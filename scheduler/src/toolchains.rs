//! Toolchain archives the scheduler has seen, kept in memory up to a byte budget, least
//! recently used first out. Only verified archives get in.

use bytes::Bytes;
use kiln_proto::Digest;

#[derive(Debug)]
pub struct Toolchains {
    cache: lru::LruCache<Digest, Bytes>,
    bytes: u64,
    budget: u64,
}

impl Toolchains {
    pub fn new(budget: u64) -> Toolchains {
        Toolchains {
            cache: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, digest: &Digest) -> Option<Bytes> {
        self.cache.get(digest).cloned()
    }

    /// The bytes kept.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.cache.contains(digest)
    }

    /// Keeps a verified archive, dropping the least recently used ones over the budget.
    pub fn insert(&mut self, digest: Digest, data: Bytes) {
        if data.len() as u64 > self.budget || self.cache.contains(&digest) {
            return;
        }
        self.bytes += data.len() as u64;
        self.cache.put(digest, data);
        while self.bytes > self.budget {
            match self.cache.pop_lru() {
                Some((_, old)) => self.bytes -= old.len() as u64,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_dropping_least_recently_used() {
        let mut t = Toolchains::new(10);
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        t.insert(a, Bytes::from_static(b"aaaa"));
        t.insert(b, Bytes::from_static(b"bbbb"));
        assert!(t.get(&a).is_some());
        t.insert(c, Bytes::from_static(b"cccc"));
        assert!(t.contains(&a) && t.contains(&c) && !t.contains(&b));
        t.insert(Digest::of(b"big"), Bytes::from(vec![0; 11]));
        assert!(!t.contains(&Digest::of(b"big")));
    }
}
