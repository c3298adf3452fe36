//! Where a C-family compile looks for headers: one model for everything that follows the
//! search path.
//!
//! The farm's include scan ([`crate::closure`]) ships every candidate on it, the cache's
//! shadowing check records the places a new header would be found first, and
//! precompiled-header detection looks for `.gch` files along it. If they modelled the path
//! each their own way, the local key and the farm's inputs could disagree about which header
//! a compile reads; so [`SearchPath::of`] is the only place that puts it together.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::args::{Compile, Lang};
use crate::compiler::Identity;
use crate::env::Env;

/// The directories one compile searches, as given (relative to the working directory), in
/// the compiler's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchPath {
    /// `-iquote`: for `#include "..."` only, after the including file's directory.
    pub quote: Vec<String>,
    /// Searched for `<...>`, and after `quote` for `"..."`: `-I`, `CPATH`, `-isystem`, the
    /// language's `*_INCLUDE_PATH`, the compiler's own directories (unless `-nostdinc`), then
    /// `-idirafter`.
    pub chain: Vec<String>,
    /// Where system headers live: the compiler's own directories for the language and
    /// `-isystem`. System headers change only with the system; kiln does not follow their
    /// `__has_include` tests.
    pub system: Vec<String>,
    /// The compiler's own directories that belong to its toolchain archive (either language's:
    /// see [`is_toolchain_dir`]): their headers are read but never shipped per job.
    pub private: Vec<PathBuf>,
}

impl SearchPath {
    /// The search path of `c` run by the compiler `id` in the environment `env`.
    pub fn of(c: &Compile, id: &Identity, env: &Env) -> SearchPath {
        let dirs = &c.include_dirs;
        let pre = &c.preprocessor;
        let own = match c.lang {
            Lang::Cxx | Lang::ObjCxx | Lang::CxxPreprocessed => &id.cxx_dirs,
            _ => &id.c_dirs,
        };
        let mut defaults: Vec<String> = if pre.nostdinc {
            Vec::new()
        } else {
            own.clone()
        };
        if pre.nostdincxx {
            // The C++ library's directories are those a C compile does not search.
            defaults.retain(|d| id.c_dirs.contains(d));
        }
        // GCC's add_env_var_paths: CPATH is searched like -I, the language's variable like
        // -isystem; an unset or empty variable adds nothing, an empty element adds ".".
        let split = |var: &str| -> Vec<String> {
            env.get(var)
                .map(|v| {
                    v.split(':')
                        .map(|d| if d.is_empty() { "." } else { d }.to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let lang_var = match c.lang {
            Lang::Cxx | Lang::CxxPreprocessed => "CPLUS_INCLUDE_PATH",
            Lang::ObjC => "OBJC_INCLUDE_PATH",
            Lang::ObjCxx => "OBJCPLUS_INCLUDE_PATH",
            _ => "C_INCLUDE_PATH",
        };
        let chain = dirs
            .angle
            .iter()
            .cloned()
            .chain(split("CPATH"))
            .chain(dirs.system.iter().cloned())
            .chain(split(lang_var))
            .chain(defaults)
            .chain(dirs.after.iter().cloned())
            .collect();
        let mut private: Vec<PathBuf> = id
            .c_dirs
            .iter()
            .chain(&id.cxx_dirs)
            .map(PathBuf::from)
            .filter(|d| is_toolchain_dir(d))
            .collect();
        private.sort();
        private.dedup();
        SearchPath {
            quote: dirs.quote.clone(),
            chain,
            system: own.iter().chain(&dirs.system).cloned().collect(),
            private,
        }
    }

    /// Every directory searched for `"..."` after the including file's own, in order.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.quote.iter().chain(&self.chain)
    }
}

/// Whether a default include directory is the compiler's own, shipped in its toolchain archive
/// rather than with each job: a directory below `lib*/gcc/` or `lib*/gcc-cross/` (gcc's
/// `libsubdir`, `<prefix>/lib/gcc/<target>/<version>`, which holds `include` and
/// `include-fixed`) or below `lib*/clang/` (clang's resource directory,
/// `<prefix>/lib/clang/<version>`). Those headers belong to one compiler version and the
/// toolchain packer takes them from where the driver reports them. Everything else a compiler
/// searches by default is a library (libc in `/usr/include`, libstdc++ in
/// `/usr/include/c++/12`, `/usr/local/include`, a cross compiler's target headers) and is
/// shipped: when unsure, shipping costs bandwidth while not shipping breaks the compile.
///
/// Only the identity's default directories are tested: a user's `-I` into another compiler's
/// private directory is shipped like any other.
pub fn is_toolchain_dir(dir: &Path) -> bool {
    let parts: Vec<&OsStr> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    parts.windows(3).any(|w| {
        w[0].as_bytes().starts_with(b"lib")
            && matches!(w[1].as_bytes(), b"gcc" | b"gcc-cross" | b"clang")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::identity;

    fn compile(line: &str) -> Compile {
        crate::args::classify(line.split_whitespace().map(str::to_owned).collect()).unwrap()
    }

    #[test]
    fn the_path_is_in_the_compilers_order() {
        let id = identity(
            &["/usr/lib/gcc/x/12/include", "/usr/include"],
            &[
                "/usr/include/c++/12",
                "/usr/lib/gcc/x/12/include",
                "/usr/include",
            ],
        );
        let env = Env::from_pairs([
            ("CPATH", "cp:"),
            ("C_INCLUDE_PATH", "cinc"),
            ("CPLUS_INCLUDE_PATH", "cxxinc"),
        ]);
        let c = compile("-c a.c -iquote q -I i -isystem s -idirafter after");
        let s = SearchPath::of(&c, &id, &env);
        assert_eq!(s.quote, ["q"]);
        assert_eq!(
            s.chain,
            [
                "i",
                "cp",
                ".",
                "s",
                "cinc",
                "/usr/lib/gcc/x/12/include",
                "/usr/include",
                "after"
            ]
        );
        assert_eq!(s.system, ["/usr/lib/gcc/x/12/include", "/usr/include", "s"]);
        assert_eq!(s.private, [PathBuf::from("/usr/lib/gcc/x/12/include")]);
        let cxx = SearchPath::of(&compile("-c a.cc -nostdinc++"), &id, &env);
        assert_eq!(
            cxx.chain,
            [
                "cp",
                ".",
                "cxxinc",
                "/usr/lib/gcc/x/12/include",
                "/usr/include"
            ]
        );
        let none = SearchPath::of(&compile("-c a.c -nostdinc"), &id, &Env::default());
        assert!(none.chain.is_empty());
    }
}
