//! kiln's content-addressed store.
//!
//! The store keeps immutable *entries* (opaque byte payloads) under 32-byte keys. It knows
//! nothing about compilers or the network: the client decides what an entry means, the store
//! guarantees that what comes back is exactly what was put, or nothing.
//!
//! - Writes are atomic: a temporary file in the destination directory, then `rename`. A process
//!   killed at any instant leaves either no entry or a complete one; leftovers are swept later.
//! - Every read verifies a BLAKE3 checksum over the payload. A torn or corrupt entry is removed
//!   and reported as a miss, never served.
//! - Eviction is least-recently-used by size (and optionally by count), per shard, so that many
//!   processes sharing one directory never hold a global lock for long.
//!
//! [`Counters`] is the small locked key/value file the store uses for its shard sizes; the
//! client reuses it for its statistics.

mod counters;
mod digest;
mod entry;
mod store;

pub use counters::Counters;
pub use digest::{Digest, DigestParseError, Hasher};
pub use entry::{EntryError, Kind};
pub use store::{
    parse_size, replace_output, write_atomically, CleanupReport, Limits, Lookup, Store, StoreError,
};
