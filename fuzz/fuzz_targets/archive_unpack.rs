//! `kiln_archive::unpack` on hostile archives. The first byte picks how the rest becomes
//! an archive:
//!
//! - 0: as is (the gzip layer is fuzzed too);
//! - 1: a tar, gzip-wrapped here after its header checksums are fixed up, so that mutations reach
//!   the tar and unpack logic instead of dying at gzip's CRC or tar's checksum;
//! - 2: a list of entries (kind, name, link target, mode, data) with names over a tiny alphabet
//!   (`a`, `b`, `/`, `.`), written into raw tar headers, so that `..`, absolute paths, symlink
//!   chains and hard links come up often.
//!
//! Whatever the result, afterwards nothing exists beside the destination, and nothing under it
//! is setuid, setgid, a device, a FIFO or a socket. When the unpack succeeded, no symlink under
//! it resolves outside it either (after an error, the partial tree is the caller's to remove).
#![no_main]

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use kiln_archive::{unpack, Limits};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_entries: 64,
    max_path: 256,
    max_depth: 8,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let archive = match mode % 3 {
        0 => rest.to_vec(),
        1 => gzip(&fix_checksums(rest)),
        _ => match Vec::<Entry>::arbitrary_take_rest(Unstructured::new(rest)) {
            Ok(entries) => gzip(&build(&entries)),
            Err(_) => return,
        },
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dest = tmp.path().join("dest");
    let unpacked = unpack(&archive[..], &dest, &LIMITS).is_ok();

    let beside: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        beside.is_empty() || beside == ["dest"],
        "created beside the destination: {beside:?}"
    );
    if dest.exists() {
        check_tree(&dest, &dest, unpacked);
    }
});

fn check_tree(dest: &Path, dir: &Path, links_too: bool) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let kind = meta.file_type();
        assert!(
            !(kind.is_block_device()
                || kind.is_char_device()
                || kind.is_fifo()
                || kind.is_socket()),
            "{path:?} is a special file"
        );
        let mode = meta.permissions().mode();
        assert_eq!(mode & 0o6000, 0, "{path:?} is setuid or setgid: {mode:o}");
        if kind.is_file() {
            assert_eq!(mode & !0o100755, 0, "{path:?} has mode {mode:o}");
        }
        if kind.is_dir() {
            check_tree(dest, &path, links_too);
        }
        if kind.is_symlink() && links_too {
            let rel = path.strip_prefix(dest).unwrap();
            assert!(
                resolves_inside(dest, rel),
                "{path:?} -> {:?} resolves outside the destination",
                fs::read_link(&path).unwrap()
            );
        }
    }
}

/// Whether `rel` under `dest` resolves inside `dest`, following symlinks as the kernel would
/// (a `..` after a symlink leaves the symlink's target, not its name). Dangling paths are
/// followed as far as they go; a loop counts as inside (it resolves to nothing).
fn resolves_inside(dest: &Path, rel: &Path) -> bool {
    let mut todo: Vec<OsString> = Vec::new(); // reversed: the next component is last
    push_front(&mut todo, rel);
    let mut at: Vec<OsString> = Vec::new(); // real directories below dest
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.to_str() {
            Some(".") => continue,
            Some("..") => {
                if at.pop().is_none() {
                    return false;
                }
                continue;
            }
            _ => {}
        }
        let here: PathBuf = std::iter::once(dest.as_os_str())
            .chain(at.iter().map(|p| p.as_os_str()))
            .chain([part.as_os_str()])
            .collect();
        match fs::read_link(&here) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return true;
                }
                if target.is_absolute() {
                    return false;
                }
                push_front(&mut todo, &target);
            }
            Err(_) => at.push(part),
        }
    }
    true
}

fn push_front(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .map(|c| match c {
            Component::ParentDir => "..".into(),
            Component::CurDir => ".".into(),
            other => other.as_os_str().to_owned(),
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

/// Recomputes the checksum of every header block, walking the archive the way a reader does.
fn fix_checksums(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = 0;
    while out.len().saturating_sub(at) >= 512 {
        let block = &mut out[at..at + 512];
        if block.iter().all(|&b| b == 0) {
            at += 512;
            continue;
        }
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(block);
        header.set_cksum();
        block.copy_from_slice(header.as_bytes());
        let size = header.entry_size().unwrap_or(0);
        at = at.saturating_add(512).saturating_add(
            usize::try_from(size.div_ceil(512).saturating_mul(512)).unwrap_or(usize::MAX),
        );
    }
    out
}

#[derive(Debug, Arbitrary)]
struct Entry {
    kind: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u16,
    data: Vec<u8>,
}

/// Entry types worth trying; anything else is one unknown type.
const KINDS: &[u8] = b"05216347SxgLK";

fn build(entries: &[Entry]) -> Vec<u8> {
    let spell = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .iter()
            .take(100)
            .map(|b| b"ab/."[usize::from(b % 4)])
            .collect()
    };
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let name = spell(&e.name);
        let link = spell(&e.link);
        h.as_old_mut().name[..name.len()].copy_from_slice(&name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(&link);
        let kind = KINDS
            .get(usize::from(e.kind) % (KINDS.len() + 1))
            .copied()
            .unwrap_or(e.kind);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(u32::from(e.mode) & 0o7777);
        h.set_size(e.data.len() as u64);
        h.set_cksum();
        tar.append(&h, &e.data[..]).unwrap();
    }
    tar.into_inner().unwrap()
}
