//! Unpacking a toolchain into an image's root, which already holds the template's system.
//!
//! The archive is unpacked by the hardened unpacker into a fresh staging directory inside the
//! root (the same filesystem, so entries can be renamed into place), then merged: the
//! toolchain's files replace the template's where both have one (the compiler must run with
//! the client's own libraries), directories are merged, and a toolchain entry that would need
//! to go through a template symlink, or change a directory into a file or back, is refused.
//! Nothing runs in the image while this happens (it is never started), so what the checks see
//! stays true.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::JailError;

/// Unpacks `archive` into `root` within `limits`, merging it over what is there.
pub(crate) fn install(
    archive: &Path,
    root: &Path,
    staging_name: &str,
    limits: &kiln_archive::Limits,
) -> Result<(), JailError> {
    let staging = root.join(staging_name);
    let file =
        fs::File::open(archive).map_err(JailError::io(format!("opening {}", archive.display())))?;
    let unpacked = kiln_archive::unpack(io::BufReader::new(file), &staging, limits);
    let merged = unpacked
        .map_err(JailError::from)
        .and_then(|_| merge(&staging, root, Path::new("/")));
    let removed = fs::remove_dir_all(&staging);
    merged?;
    removed.map_err(JailError::io(format!("removing {}", staging.display())))
}

fn merge(from_dir: &Path, to_dir: &Path, jail_dir: &Path) -> Result<(), JailError> {
    let entries =
        fs::read_dir(from_dir).map_err(JailError::io(format!("listing {}", from_dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(JailError::io(format!("listing {}", from_dir.display())))?;
        let name = entry.file_name();
        let from = from_dir.join(&name);
        let to = to_dir.join(&name);
        let jail_path: PathBuf = jail_dir.join(&name);
        let is_dir = entry
            .file_type()
            .map_err(JailError::io(format!("stat {}", from.display())))?
            .is_dir();
        let collision =
            |why: &str| JailError::Setup(format!("the toolchain's {} {why}", jail_path.display()));
        match fs::symlink_metadata(&to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(&from, &to)
                .map_err(JailError::io(format!("placing {}", to.display())))?,
            Err(e) => {
                return Err(JailError::Io {
                    what: format!("stat {}", to.display()),
                    source: e,
                })
            }
            // symlink_metadata never follows a link: a template symlink is not a directory.
            Ok(there) if is_dir && there.is_dir() => merge(&from, &to, &jail_path)?,
            Ok(_) if is_dir => {
                return Err(collision(
                    "directory is a file or a symlink in the template pot",
                ))
            }
            Ok(there) if there.is_dir() => {
                return Err(collision("is a directory in the template pot"))
            }
            Ok(_) => {
                fs::remove_file(&to)
                    .map_err(JailError::io(format!("replacing {}", to.display())))?;
                fs::rename(&from, &to)
                    .map_err(JailError::io(format!("placing {}", to.display())))?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_archive::{Manifest, Source};

    #[test]
    fn pot_toolchains_merge_over_the_template_and_never_through_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fs::create_dir(&host).unwrap();
        let lib = host.join("libc.so");
        let gcc = host.join("gcc");
        fs::write(&lib, b"client libc").unwrap();
        fs::write(&gcc, b"gcc").unwrap();
        let mut m = Manifest::default();
        let file = |host: &Path| Source::File {
            host: host.to_path_buf(),
            executable: true,
        };
        m.add("lib/libc.so", file(&lib));
        m.add("usr/bin/gcc", file(&gcc));
        let archive = dir.path().join("tc.tar.gz");
        m.pack(fs::File::create(&archive).unwrap()).unwrap();

        let root = dir.path().join("m");
        fs::create_dir_all(root.join("lib")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("lib/libc.so"), b"template libc").unwrap();
        fs::write(root.join("bin/sh"), b"sh").unwrap();
        install(&archive, &root, ".staging", &Default::default()).unwrap();
        assert_eq!(fs::read(root.join("lib/libc.so")).unwrap(), b"client libc");
        assert_eq!(fs::read(root.join("usr/bin/gcc")).unwrap(), b"gcc");
        assert_eq!(fs::read(root.join("bin/sh")).unwrap(), b"sh");
        assert!(!root.join(".staging").exists());

        // A template whose /usr is a link (absolute: from the host it would lead out).
        let root = dir.path().join("m2");
        fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(outside.join("bin")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("usr")).unwrap();
        let err = install(&archive, &root, ".staging", &Default::default()).unwrap_err();
        assert!(err.to_string().contains("/usr directory"), "{err}");
        assert!(
            !outside.join("bin/gcc").exists(),
            "followed a template link"
        );
        assert!(!root.join(".staging").exists());
    }
}
