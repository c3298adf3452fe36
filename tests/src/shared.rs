//! Two machines sharing results through a remote tier: each a [`Project`] with an empty local
//! cache of its own and the same small source and header, as a team's checkouts would be.

use crate::{ok, Project};

/// The compile each machine runs.
pub const ARGS: [&str; 7] = ["gcc", "-c", "src/m.c", "-o", "m.o", "-Iinc", "-O2"];

/// A machine whose kiln uses the remote cache at `url`, with `env` set besides.
pub fn machine(url: &str, env: &[(&str, &str)]) -> Project {
    let mut p = Project::with_remote(url);
    p.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    p.write("inc/v.h", "#define V 42\n");
    p.write(
        "src/m.c",
        "#include <stdio.h>\n#include \"v.h\"\nint m(void) { return printf(\"%d\\n\", V); }\n",
    );
    crate::settle();
    p
}

/// Compiles [`ARGS`] on `p`, which must miss and upload its result and its manifest.
pub fn stores(p: &Project) {
    ok(&p.kiln(&ARGS));
    let s = p.stats();
    assert_eq!(
        (s["misses"].as_i64(), s["remote_uploads"].as_i64()),
        (Some(1), Some(2)),
        "{s}"
    );
}

/// Compiles [`ARGS`] on `p`, which must be served by the remote tier the object the compiler
/// itself makes.
pub fn is_served(p: &Project) {
    p.kiln_matches_bare(&ARGS, "m.o");
    let s = p.stats();
    assert_eq!(
        (s["hits"].as_i64(), s["remote_hits"].as_i64()),
        (Some(1), Some(1)),
        "{s}"
    );
}
