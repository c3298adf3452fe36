use super::*;

/// Builds a raw gzip'd tar entry by entry, writing names straight into the header so hostile
/// paths (which `tar::Header::set_path` would refuse) can be expressed.
struct Raw(tar::Builder<GzEncoder<Vec<u8>>>);

impl Raw {
    fn new() -> Raw {
        Raw(tar::Builder::new(GzEncoder::new(
            Vec::new(),
            Compression::fast(),
        )))
    }

    fn entry(
        mut self,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        mode: u32,
        data: &[u8],
    ) -> Raw {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Raw {
        self.entry(tar::EntryType::Regular, name, "", 0o644, data)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap().finish().unwrap()
    }
}

fn unpack_into(
    bytes: &[u8],
    limits: &Limits,
) -> (tempfile::TempDir, Result<Unpacked, ArchiveError>) {
    let dir = tempfile::tempdir().unwrap();
    let result = unpack(bytes, &dir.path().join("root"), limits);
    (dir, result)
}

fn refused(bytes: &[u8]) -> ArchiveError {
    let (dir, result) = unpack_into(bytes, &Limits::default());
    // Whatever was refused, nothing landed outside the destination.
    let outside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "root")
        .collect();
    assert!(
        outside.is_empty(),
        "wrote outside the destination: {outside:?}"
    );
    result.expect_err("a hostile archive was accepted")
}

#[test]
fn packs_deterministically_and_round_trips() {
    let src = tempfile::tempdir().unwrap();
    let tool = src.path().join("tool");
    fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();
    let data = src.path().join("data");
    fs::write(&data, b"data").unwrap();

    let mut m = Manifest::default();
    m.add(
        "usr/bin/tool",
        Source::File {
            host: tool.clone(),
            executable: true,
        },
    );
    m.add(
        "usr/share/data",
        Source::File {
            host: data,
            executable: false,
        },
    );
    m.add("usr/empty", Source::Dir);
    m.add("bin", Source::Symlink("usr/bin".into()));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    m.pack(&mut a).unwrap();
    // Same files, other timestamps: still the same bytes.
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    m.pack(&mut b).unwrap();
    assert_eq!(a, b, "packing is not deterministic");

    let (dir, result) = unpack_into(&a, &Limits::default());
    let root = dir.path().join("root");
    assert_eq!(
        result.unwrap(),
        Unpacked {
            files: 2,
            bytes: 22
        }
    );
    assert_eq!(
        fs::read(root.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    let mode = fs::metadata(root.join("usr/bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    let mode = fs::metadata(root.join("usr/share/data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
    assert!(root.join("usr/empty").is_dir());
}

#[test]
fn refuses_traversal_and_absolute_paths() {
    assert!(matches!(
        refused(&Raw::new().file("../evil", b"x").bytes()),
        ArchiveError::Traversal(_)
    ));
    assert!(matches!(
        refused(&Raw::new().file("a/../../evil", b"x").bytes()),
        ArchiveError::Traversal(_)
    ));
    assert!(matches!(
        refused(&Raw::new().file("/tmp/evil", b"x").bytes()),
        ArchiveError::Absolute(_)
    ));
}

#[test]
fn refuses_links_that_escape_and_writes_through_links() {
    let sym = tar::EntryType::Symlink;
    let escaping = Raw::new()
        .entry(sym, "a/out", "../../etc/passwd", 0o777, b"")
        .bytes();
    assert!(matches!(
        refused(&escaping),
        ArchiveError::EscapingLink { .. }
    ));
    let absolute = Raw::new()
        .entry(sym, "out.o", "/etc/shadow", 0o777, b"")
        .bytes();
    assert!(matches!(
        refused(&absolute),
        ArchiveError::EscapingLink { .. }
    ));
    // Even a link that stays inside may not be a path to write through: the next entry could
    // otherwise land wherever a later link points.
    let through = Raw::new()
        .entry(tar::EntryType::Directory, "sub", "", 0o755, b"")
        .entry(sym, "lnk", "sub", 0o777, b"")
        .file("lnk/file", b"x")
        .bytes();
    assert!(matches!(refused(&through), ArchiveError::ThroughLink(_)));
    let hard = Raw::new()
        .entry(tar::EntryType::Link, "h", "/etc/passwd", 0o644, b"")
        .bytes();
    assert!(matches!(refused(&hard), ArchiveError::Absolute(_)));
    let dangling = Raw::new()
        .entry(tar::EntryType::Link, "h", "missing", 0o644, b"")
        .bytes();
    assert!(matches!(refused(&dangling), ArchiveError::BadHardLink(_)));
    let inside = Raw::new()
        .file("f", b"x")
        .entry(tar::EntryType::Link, "h", "f", 0o644, b"")
        .entry(sym, "s", "f", 0o777, b"")
        .bytes();
    let (dir, result) = unpack_into(&inside, &Limits::default());
    result.unwrap();
    assert_eq!(fs::read(dir.path().join("root/h")).unwrap(), b"x");
}

#[test]
fn refuses_devices_fifos_sparse_files_and_strips_setuid() {
    for kind in [
        tar::EntryType::Char,
        tar::EntryType::Block,
        tar::EntryType::Fifo,
    ] {
        let bytes = Raw::new().entry(kind, "dev", "", 0o666, b"").bytes();
        assert!(
            matches!(refused(&bytes), ArchiveError::Unsupported { .. }),
            "{kind:?} accepted"
        );
    }
    // A sparse entry would be written with holes: refused (by the reader, which wants a GNU
    // header, or by the type check).
    let sparse = Raw::new()
        .entry(tar::EntryType::GNUSparse, "s", "", 0o644, b"")
        .bytes();
    refused(&sparse);
    let setuid = Raw::new()
        .entry(tar::EntryType::Regular, "su", "", 0o6777, b"x")
        .bytes();
    let (dir, result) = unpack_into(&setuid, &Limits::default());
    result.unwrap();
    let mode = fs::metadata(dir.path().join("root/su"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn refuses_duplicates() {
    let twice = Raw::new().file("f", b"1").file("f", b"2").bytes();
    assert!(matches!(refused(&twice), ArchiveError::Duplicate(_)));
}

#[test]
fn stops_bombs_and_oversized_archives_early() {
    // 64 MiB of zeros compress to ~64 KiB.
    let zeros = vec![0u8; 64 << 20];
    let bomb = Raw::new().file("zeros", &zeros).bytes();
    assert!(bomb.len() < 1 << 20);
    let limits = Limits {
        max_bytes: 1 << 20,
        ..Limits::default()
    };
    let (dir, result) = unpack_into(&bomb, &limits);
    assert!(
        matches!(result, Err(ArchiveError::TooLarge(_))),
        "{result:?}"
    );
    // It stopped at the limit rather than writing the file out.
    let written = fs::metadata(dir.path().join("root/zeros"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 1 << 20, "wrote {written} bytes");

    let mut many = Raw::new();
    for i in 0..20 {
        many = many.file(&format!("f{i}"), b"");
    }
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    assert!(matches!(
        unpack_into(&many.bytes(), &limits).1,
        Err(ArchiveError::TooManyEntries(10))
    ));

    let deep = Raw::new()
        .file(&"d/".repeat(30).to_string().add_file(), b"")
        .bytes();
    let limits = Limits {
        max_depth: 10,
        ..Limits::default()
    };
    assert!(matches!(
        unpack_into(&deep, &limits).1,
        Err(ArchiveError::TooDeep { .. })
    ));
    let limits = Limits {
        max_path: 20,
        ..Limits::default()
    };
    assert!(matches!(
        unpack_into(&deep, &limits).1,
        Err(ArchiveError::PathTooLong { .. })
    ));
}

trait AddFile {
    fn add_file(self) -> String;
}

impl AddFile for String {
    fn add_file(self) -> String {
        self + "f"
    }
}

#[test]
fn garbage_is_a_read_error_not_a_panic() {
    let (_dir, result) = unpack_into(b"this is not gzip at all", &Limits::default());
    assert!(matches!(result, Err(ArchiveError::Read(_))), "{result:?}");
    let good = Raw::new().file("f", &[7u8; 5000]).bytes();
    let (_dir, result) = unpack_into(&good[..good.len() / 2], &Limits::default());
    assert!(result.is_err(), "a truncated archive was accepted");
}

#[test]
fn refuses_links_that_escape_through_other_links() {
    let sym = tar::EntryType::Symlink;
    // Each stays inside on its own; together `l` is the destination's parent. In either order.
    let dot_then_up = Raw::new()
        .entry(sym, "s", ".", 0o777, b"")
        .entry(sym, "l", "s/..", 0o777, b"")
        .bytes();
    let up_then_dot = Raw::new()
        .entry(sym, "a/l", "s/../../x", 0o777, b"")
        .entry(sym, "a/s", "..", 0o777, b"")
        .bytes();
    for archive in [dot_then_up, up_then_dot] {
        assert!(matches!(
            refused(&archive),
            ArchiveError::EscapingLink { .. }
        ));
    }
    // Chains that stay inside, a dangling link and a `..` through a real directory still do.
    let inside = Raw::new()
        .entry(tar::EntryType::Directory, "d/e", "", 0o755, b"")
        .entry(sym, "d/up", "..", 0o777, b"")
        .entry(sym, "d/e/l", "../up/d/e", 0o777, b"")
        .entry(sym, "x", "d/e/../../missing", 0o777, b"")
        .entry(sym, "lib64", "d/e/l", 0o777, b"")
        .bytes();
    let (_dir, result) = unpack_into(&inside, &Limits::default());
    result.unwrap();
}

/// An archive of `(name, target)` symlinks, with GNU long names for targets over 100 bytes.
fn symlinks(dirs: &[&str], links: &[(String, String)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, d, io::empty()).unwrap();
    }
    for (name, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, name, target).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn links_that_take_too_long_to_follow_are_refused() {
    // A long target costs a step per part when the links are followed: capped like names.
    let long = symlinks(&["d"], &[("l".into(), "d/./".repeat(300))]);
    assert!(matches!(
        refused(&long),
        ArchiveError::PathTooLong { len: 1200, .. }
    ));
    // Each link stays within 40 hops of ~400 parts, yet a hundred of them would walk 1.5
    // million parts: the check's budget runs out and the archive is refused, quickly.
    let mut links: Vec<(String, String)> = (0..38)
        .map(|i| {
            (
                format!("L{i}"),
                format!("{}L{}", "d/../".repeat(200), i + 1),
            )
        })
        .collect();
    links.push(("L38".into(), "d".into()));
    let chain = symlinks(&["d"], &links);
    let (_dir, result) = unpack_into(&chain, &Limits::default());
    result.expect("one chain of 40 links is fine");
    links.extend((0..100).map(|j| (format!("M{j}"), "L0".into())));
    let tangled = symlinks(&["d"], &links);
    assert!(matches!(refused(&tangled), ArchiveError::TangledLinks(_)));
}

#[test]
fn link_containment_is_lexical() {
    assert!(link_stays_inside(Path::new("a/b/l"), Path::new("../c")));
    assert!(link_stays_inside(Path::new("a/b/l"), Path::new("../../c")));
    assert!(!link_stays_inside(
        Path::new("a/b/l"),
        Path::new("../../../c")
    ));
    assert!(!link_stays_inside(Path::new("l"), Path::new("/abs")));
    assert!(!link_stays_inside(Path::new("l"), Path::new("")));
}
