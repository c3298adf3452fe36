//! The content digest: BLAKE3, 32 bytes, printed as lowercase hex.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3 digest naming content (a file, an entry, a cache key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a digest (want 64 hex digits): {0:?}")]
pub struct DigestParseError(String);

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Digest, DigestParseError> {
        let bad = || DigestParseError(s.chars().take(80).collect());
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(bad)?;
            let lo = hex_val(pair[1]).ok_or_else(bad)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Builds a digest from several fields. Each field is length-prefixed, so `("ab", "c")` and
/// `("a", "bc")` never collide.
#[derive(Clone, Default)]
pub struct Hasher(blake3::Hasher);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    /// A hasher whose output is distinct for each `domain` string.
    pub fn new(domain: &str) -> Hasher {
        let mut h = Hasher(blake3::Hasher::new());
        h.field(domain.as_bytes());
        h
    }

    /// Adds one length-prefixed field.
    pub fn field(&mut self, data: &[u8]) -> &mut Hasher {
        self.0.update(&(data.len() as u64).to_le_bytes());
        self.0.update(data);
        self
    }

    /// Adds a string field.
    pub fn str(&mut self, s: &str) -> &mut Hasher {
        self.field(s.as_bytes())
    }

    /// Adds a digest field.
    pub fn digest(&mut self, d: &Digest) -> &mut Hasher {
        self.field(&d.0)
    }

    /// The digest of everything added so far.
    pub fn finish(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"kiln");
        let parsed: Digest = d.to_hex().parse().unwrap();
        assert_eq!(parsed, d);
        assert!("zz".parse::<Digest>().is_err());
        assert!("g".repeat(64).parse::<Digest>().is_err());
    }

    #[test]
    fn fields_are_delimited() {
        let a = Hasher::new("t").str("ab").str("c").finish();
        let b = Hasher::new("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = Hasher::new("u").str("ab").str("c").finish();
        assert_ne!(a, c);
    }
}
