//! Content on the wire: splitting bytes into [`v1::Chunk`]s and putting them back together,
//! checked against the digest that names them.

use bytes::{Bytes, BytesMut};

use crate::{digest_of, v1, wire_digest, BadDigest, Digest};

/// The size of one chunk: small enough that a job's chunks interleave with other jobs' on a
/// builder's stream, large enough that framing costs nothing.
pub const CHUNK: usize = 1 << 20;

/// The chunks that carry `data`, named by `digest`. They share `data`'s buffer.
pub fn chunks(digest: &Digest, data: &Bytes) -> impl Iterator<Item = v1::Chunk> + 'static {
    let wire = wire_digest(digest, data.len() as u64);
    let data = data.clone();
    // An empty file still needs one chunk to say so.
    let count = data.len().div_ceil(CHUNK).max(1);
    (0..count).map(move |i| {
        let start = i * CHUNK;
        let end = (start + CHUNK).min(data.len());
        v1::Chunk {
            digest: Some(wire.clone()),
            offset: start as u64,
            data: data.slice(start..end),
        }
    })
}

/// Why chunks could not be put back together.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Digest(#[from] BadDigest),
    #[error("a chunk without a digest")]
    Unnamed,
    #[error("content of {size} bytes is over the limit of {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("chunk at offset {got} where {expected} was next")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("chunks run past the declared size of {size} bytes")]
    Overrun { size: u64 },
    #[error("content does not match its digest (declared {declared}, got {actual})")]
    Mismatch { declared: Digest, actual: Digest },
}

/// The digest a chunk belongs to.
pub fn chunk_digest(chunk: &v1::Chunk) -> Result<(Digest, u64), ContentError> {
    let wire = chunk.digest.as_ref().ok_or(ContentError::Unnamed)?;
    Ok((digest_of(wire)?, wire.size))
}

/// One piece of content being received. Chunks must arrive in order, as they do on one stream.
#[derive(Debug)]
pub struct Assembly {
    digest: Digest,
    size: u64,
    buf: BytesMut,
}

impl Assembly {
    /// Starts receiving the content named by `digest`, `size` bytes long; refuses sizes over `max`
    /// before any byte is buffered.
    pub fn new(digest: Digest, size: u64, max: u64) -> Result<Assembly, ContentError> {
        if size > max {
            return Err(ContentError::TooLarge { size, max });
        }
        Ok(Assembly {
            digest,
            size,
            // The size is declared by the peer: grow as bytes arrive rather than trusting it.
            buf: BytesMut::with_capacity(size.min(CHUNK as u64) as usize),
        })
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Adds a chunk; returns the whole content, verified, once the last chunk is in.
    pub fn add(&mut self, chunk: &v1::Chunk) -> Result<Option<Bytes>, ContentError> {
        let have = self.buf.len() as u64;
        if chunk.offset != have {
            return Err(ContentError::OutOfOrder {
                expected: have,
                got: chunk.offset,
            });
        }
        if have + chunk.data.len() as u64 > self.size {
            return Err(ContentError::Overrun { size: self.size });
        }
        self.buf.extend_from_slice(&chunk.data);
        if (self.buf.len() as u64) < self.size {
            return Ok(None);
        }
        let data = std::mem::take(&mut self.buf).freeze();
        let actual = Digest::of(&data);
        if actual != self.digest {
            return Err(ContentError::Mismatch {
                declared: self.digest,
                actual,
            });
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reassemble(data: &[u8]) -> Result<Bytes, ContentError> {
        let bytes = Bytes::copy_from_slice(data);
        let digest = Digest::of(data);
        let mut asm = Assembly::new(digest, data.len() as u64, u64::MAX)?;
        let mut out = None;
        for chunk in chunks(&digest, &bytes) {
            assert!(out.is_none(), "content completed before its last chunk");
            out = asm.add(&chunk)?;
        }
        Ok(out.expect("the last chunk completes the content"))
    }

    #[test]
    fn round_trips_empty_small_and_multi_chunk_content() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            assert_eq!(reassemble(&data).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn refuses_tampered_reordered_oversized_and_overrunning_chunks() {
        let data = Bytes::from(vec![5u8; CHUNK + 10]);
        let digest = Digest::of(&data);
        let mut pieces: Vec<_> = chunks(&digest, &data).collect();

        let mut asm = Assembly::new(digest, data.len() as u64, u64::MAX).unwrap();
        assert!(matches!(
            asm.add(&pieces[1]),
            Err(ContentError::OutOfOrder { expected: 0, .. })
        ));

        let mut asm = Assembly::new(digest, data.len() as u64, u64::MAX).unwrap();
        let mut bad = pieces[1].data.to_vec();
        bad[3] ^= 1;
        pieces[1].data = bad.into();
        asm.add(&pieces[0]).unwrap();
        assert!(matches!(
            asm.add(&pieces[1]),
            Err(ContentError::Mismatch { .. })
        ));

        assert!(matches!(
            Assembly::new(digest, 100, 99),
            Err(ContentError::TooLarge { size: 100, max: 99 })
        ));

        let mut asm = Assembly::new(digest, 4, u64::MAX).unwrap();
        assert!(matches!(
            asm.add(&pieces[0]),
            Err(ContentError::Overrun { size: 4 })
        ));
    }
}
