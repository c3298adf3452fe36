//! The one door to the process environment.
//!
//! kiln reads environment variables in exactly one place: [`Env::capture`] takes a snapshot at
//! start-up, and everything else asks the snapshot. Tests build an [`Env`] from a list.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

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
