//! The one door to the process environment.
//!
//! kiln reads environment variables in exactly one place: [`Env::capture`] takes a snapshot at
//! start-up, and everything else asks the snapshot. Tests build an [`Env`] from a list.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// A snapshot of the environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<OsString, OsString>,
}

impl Env {
    /// The current process's environment.
    pub fn capture() -> Env {
        Env {
            vars: std::env::vars_os().collect(),
        }
    }

    /// An environment made of the given pairs (for tests).
    pub fn from_pairs<K: Into<OsString>, V: Into<OsString>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Env {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The raw value of `name`.
    pub fn os(&self, name: &str) -> Option<&OsStr> {
        self.vars.get(OsStr::new(name)).map(OsString::as_os_str)
    }

    /// The value of `name` as text; unset, empty and non-UTF-8 values are `None`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.os(name)
            .and_then(OsStr::to_str)
            .filter(|s| !s.is_empty())
    }

    /// A boolean variable: `1`, `true`, `yes`, `on` are true; `0`, `false`, `no`, `off` false.
    pub fn flag(&self, name: &str) -> Option<bool> {
        match self.get(name)?.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" => Some(false),
            _ => None,
        }
    }

    /// Where `execvp` would find the program `name`: the first executable regular file called
    /// `name` in a directory of `PATH` (glibc's `/bin:/usr/bin` when it is unset) that `accept`
    /// takes. The compiler kiln runs and the programs its driver runs are found the same way.
    pub fn find_program(
        &self,
        name: &str,
        accept: impl Fn(&Path, &std::fs::Metadata) -> bool,
    ) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.os("PATH").unwrap_or(OsStr::new("/bin:/usr/bin"));
        std::env::split_paths(path)
            .map(|dir| dir.join(name))
            .find(|p| {
                std::fs::metadata(p).is_ok_and(|m| {
                    m.is_file() && m.permissions().mode() & 0o111 != 0 && accept(p, &m)
                })
            })
    }
}

/// Variables that change what the compiler produces, hashed into every key when set.
pub const COMPILER_VARS: &[&str] = &[
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "OBJCPLUS_INCLUDE_PATH",
    "SOURCE_DATE_EPOCH",
    "COMPILER_PATH",
    "GCC_EXEC_PREFIX",
    "CCC_OVERRIDE_OPTIONS",
    "SDKROOT",
    "MACOSX_DEPLOYMENT_TARGET",
    // Diagnostics are translated and wrapped by these.
    "LANG",
    "LC_ALL",
    "LC_MESSAGES",
    "LC_CTYPE",
    "LANGUAGE",
    "COLUMNS",
    "GCC_COLORS",
    "TERM",
];

/// Variables that make the compiler write files kiln does not capture.
pub const SIDE_OUTPUT_VARS: &[&str] = &[
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "CC_PRINT_HEADERS",
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn programs_are_found_in_path_order_past_the_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            let p = d.join("cc");
            std::fs::write(&p, "").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Not executable: passed over as execvp would.
        std::fs::write(dir.path().join("cc"), "").unwrap();
        let path = std::env::join_paths([dir.path(), &a, &b]).unwrap();
        let env = Env::from_pairs([("PATH", path)]);
        assert_eq!(env.find_program("cc", |_, _| true), Some(a.join("cc")));
        assert_eq!(
            env.find_program("cc", |p, _| !p.starts_with(&a)),
            Some(b.join("cc"))
        );
        assert_eq!(env.find_program("nothere", |_, _| true), None);
    }
}
