//! A cached compile result: everything the compiler produced that the build can see.

use kiln_cache::Digest;

use crate::codec::{Reader, Writer};

const FORMAT: u8 = 1;

/// The parts of a result, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Object = 1,
    Stdout = 2,
    Stderr = 3,
    DepFile = 4,
    Dwo = 5,
}

impl Part {
    fn from_tag(t: u8) -> Option<Part> {
        Some(match t {
            1 => Part::Object,
            2 => Part::Stdout,
            3 => Part::Stderr,
            4 => Part::DepFile,
            5 => Part::Dwo,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompileResult {
    /// How long the real compile took, for "time saved".
    pub compile_ms: u32,
    pub parts: Vec<(Part, Vec<u8>)>,
}

impl CompileResult {
    pub fn get(&self, part: Part) -> Option<&[u8]> {
        self.parts
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, b)| b.as_slice())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(FORMAT);
        w.u32(self.compile_ms);
        w.u32(self.parts.len() as u32);
        for (part, bytes) in &self.parts {
            w.u8(*part as u8);
            w.bytes(bytes);
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Option<CompileResult> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT {
            return None;
        }
        let compile_ms = r.u32()?;
        let n = r.u32()?;
        let mut parts = Vec::new();
        for _ in 0..n {
            let part = Part::from_tag(r.u8()?)?;
            parts.push((part, r.bytes()?.to_vec()));
        }
        (r.is_empty() && parts.iter().any(|(p, _)| *p == Part::Object))
            .then_some(CompileResult { compile_ms, parts })
    }

    /// The digest of the object, for logs.
    pub fn object_digest(&self) -> Option<Digest> {
        self.get(Part::Object).map(Digest::of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_object_required() {
        let r = CompileResult {
            compile_ms: 12,
            parts: vec![(Part::Object, b"o".to_vec()), (Part::Stderr, b"w".to_vec())],
        };
        assert_eq!(CompileResult::decode(&r.encode()), Some(r));
        let none = CompileResult {
            compile_ms: 1,
            parts: vec![(Part::Stderr, b"w".to_vec())],
        };
        assert_eq!(CompileResult::decode(&none.encode()), None);
    }
}
