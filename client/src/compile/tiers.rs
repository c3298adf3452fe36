//! The cache tiers a compile is looked up in and stored to: the local store, then the remote
//! one (`KILN_REMOTE_CACHE`), with what this process did with the remote counted.

use kiln_cache::{Digest, Kind, Lookup, Store};

use crate::manifest::Manifest;
use crate::remote::{self, Remote};
use crate::result::CompileResult;

/// The local store and, behind it, the remote tier with what this process did with it.
pub(super) struct Tiers<'a> {
    pub store: &'a Store,
    pub remote: Option<Remote>,
    pub counts: remote::Counts,
    pub corrupt: u32,
}

impl Tiers<'_> {
    /// An entry from the local store, else from the remote tier (then copied into the local
    /// store). The flag says it came from the remote tier.
    pub(super) fn fetch(
        &mut self,
        kind: Kind,
        remote_kind: remote::Entry,
        key: &Digest,
    ) -> anyhow::Result<Option<(Vec<u8>, bool)>> {
        match self.store.get(kind, key)? {
            Lookup::Hit(bytes) => return Ok(Some((bytes, false))),
            Lookup::Corrupt(e) => {
                tracing::debug!("the local {kind:?} entry was damaged ({e}) and has been removed");
                self.corrupt += 1;
            }
            Lookup::Miss => {}
        }
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        match remote.get(remote_kind, key) {
            Ok(Some(bytes)) => {
                if let Err(e) = self.store.put(kind, key, &bytes) {
                    tracing::debug!(error = %e, "cannot copy a remote entry into the local cache");
                }
                Ok(Some((bytes, true)))
            }
            Ok(None) => Ok(None),
            Err(_) => {
                self.counts.errors += 1;
                Ok(None)
            }
        }
    }

    /// The server's manifest for a key, if there is a server and it has one.
    pub(super) fn remote_manifest(&mut self, key: &Digest) -> Option<Manifest> {
        match self.remote.as_ref()?.get(remote::Entry::Manifest, key) {
            Ok(found) => Manifest::decode(&found?),
            Err(_) => {
                self.counts.errors += 1;
                None
            }
        }
    }

    /// A result, decoded; one that does not decode is removed and is a miss.
    pub(super) fn fetch_result(&mut self, key: &Digest) -> anyhow::Result<Option<CompileResult>> {
        let Some((bytes, remote)) = self.fetch(Kind::Result, remote::Entry::Result, key)? else {
            return Ok(None);
        };
        match CompileResult::decode(&bytes) {
            Some(r) => {
                self.counts.hits += i64::from(remote);
                Ok(Some(r))
            }
            None => {
                let _ = self.store.remove(Kind::Result, key);
                Ok(None)
            }
        }
    }
}

/// Pushes a result and its manifest from the local store to the remote tier. The manifest
/// pushed, and kept locally, also holds what other machines recorded for the same key there.
pub fn push_entries(
    store: &Store,
    remote: &Remote,
    counts: &mut remote::Counts,
    manifest_key: &Digest,
    result_key: &Digest,
) {
    fn push(
        remote: &Remote,
        counts: &mut remote::Counts,
        kind: remote::Entry,
        key: &Digest,
        bytes: &[u8],
    ) {
        match remote.put(kind, key, bytes) {
            Ok(true) => counts.uploads += 1,
            Ok(false) => {}
            Err(_) => counts.errors += 1,
        }
    }
    if let Ok(Lookup::Hit(result)) = store.get(Kind::Result, result_key) {
        push(remote, counts, remote::Entry::Result, result_key, &result);
    }
    let Ok(Lookup::Hit(bytes)) = store.get(Kind::Manifest, manifest_key) else {
        return;
    };
    let Some(mut manifest) = Manifest::decode(&bytes) else {
        return;
    };
    match remote.get(remote::Entry::Manifest, manifest_key) {
        Ok(Some(theirs)) => {
            if let Some(theirs) = Manifest::decode(&theirs) {
                manifest.merge(&theirs);
            }
        }
        Ok(None) => {}
        Err(_) => counts.errors += 1,
    }
    let merged = manifest.encode();
    if merged != bytes {
        let _ = store.put(Kind::Manifest, manifest_key, &merged);
    }
    push(
        remote,
        counts,
        remote::Entry::Manifest,
        manifest_key,
        &merged,
    );
}
