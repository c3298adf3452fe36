//! The on-disk framing of one entry: a fixed header, then the payload.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "KILN"
//! 4       1     format version (1)
//! 5       1     kind (b'R' result, b'M' manifest, b'B' blob)
//! 6       2     reserved, zero
//! 8       8     payload length, little endian
//! 16      32    BLAKE3 of the payload
//! 48      …     payload
//! ```
//!
//! The checksum covers the payload; the length and kind are checked against the header, so a
//! truncated file, a file of the wrong kind, or flipped bits anywhere are all detected.

use crate::Digest;

const MAGIC: &[u8; 4] = b"KILN";
const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 48;

/// What an entry holds. The store keeps kinds apart so a key can never name the wrong one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A compile result (objects, diagnostics, exit status).
    Result,
    /// A direct-mode manifest (which headers lead to which result).
    Manifest,
    /// An opaque blob, addressed by the digest of its own content.
    Blob,
    /// An action-cache entry: what an action (named by its own key) produced.
    Action,
    /// A file stored as it is, without framing, for tools that read it directly (Go's
    /// `DiskPath`); its reader verifies it. Never returned by [`crate::Store::get`].
    Raw,
}

impl Kind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            Kind::Result => b'R',
            Kind::Manifest => b'M',
            Kind::Blob => b'B',
            Kind::Action => b'A',
            Kind::Raw => b'O',
        }
    }
}

/// Why stored bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry is shorter than its header ({0} bytes)")]
    Truncated(usize),
    #[error("entry has a bad magic number")]
    BadMagic,
    #[error("entry format version {0} is not supported (this kiln reads version {VERSION})")]
    Version(u8),
    #[error("entry is of kind {found:?}, expected {expected:?}")]
    WrongKind { found: char, expected: char },
    #[error("entry length mismatch: header says {header}, file has {actual}")]
    Length { header: u64, actual: u64 },
    #[error("entry checksum mismatch")]
    Checksum,
}

/// Frames `payload` for storage.
pub(crate) fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind.tag());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Digest::of(payload).0);
    out.extend_from_slice(payload);
    out
}

/// Checks a stored entry and returns its payload.
pub(crate) fn decode(kind: Kind, mut bytes: Vec<u8>) -> Result<Vec<u8>, EntryError> {
    if bytes.len() < HEADER_LEN {
        return Err(EntryError::Truncated(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(EntryError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(EntryError::Version(bytes[4]));
    }
    if bytes[5] != kind.tag() {
        return Err(EntryError::WrongKind {
            found: char::from(bytes[5]),
            expected: char::from(kind.tag()),
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let header_len = u64::from_le_bytes(len);
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if header_len != actual {
        return Err(EntryError::Length {
            header: header_len,
            actual,
        });
    }
    if Digest::of(&bytes[HEADER_LEN..]).0[..] != bytes[16..48] {
        return Err(EntryError::Checksum);
    }
    bytes.drain(..HEADER_LEN);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let framed = encode(Kind::Result, b"object bytes");
        assert_eq!(decode(Kind::Result, framed).unwrap(), b"object bytes");
    }

    #[test]
    fn every_damage_is_detected() {
        let framed = encode(Kind::Result, b"object bytes");
        // Flip each byte in turn: every position is covered by some check.
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x40;
            if i == 6 || i == 7 {
                continue; // reserved bytes carry no meaning
            }
            assert!(
                decode(Kind::Result, bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        for cut in 0..framed.len() {
            assert!(decode(Kind::Result, framed[..cut].to_vec()).is_err());
        }
        assert_eq!(
            decode(Kind::Manifest, framed),
            Err(EntryError::WrongKind {
                found: 'R',
                expected: 'M'
            })
        );
    }
}
