//! How long the farm's include scan takes for a few system-heavy sources, per compiler.
//!
//! `cargo run --release -p kiln-client --example scan-speed`
//!
//! A `--dist` compile scans its includes before it is sent: this is the client-side cost of
//! that step, measured outside the test suite (a timed test would race the machine's load).
//! It prints, per compiler, the files found and the minimum and median of 300 scans.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_client::env::Env;
use kiln_client::search_path::SearchPath;
use kiln_client::{args, closure, compiler};

const SOURCES: [(&str, &str, &str); 2] = [
    (
        "g++",
        "x.cpp",
        "#include <vector>\n#include <string>\n#include <map>\n#include <iostream>\n",
    ),
    (
        "gcc",
        "x.c",
        "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n",
    ),
];

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root: PathBuf = dir.path().canonicalize()?;
    let records = root.join("records");
    std::fs::create_dir_all(&records)?;
    let env = Env::capture();
    for (name, file, text) in SOURCES {
        let src = root.join(file);
        std::fs::write(&src, text)?;
        let path = compiler::find(name, &env, Path::new("/nonexistent"))?;
        let id = compiler::identify(&path, &records)?;
        let c = args::classify(vec!["-c".into(), src.to_string_lossy().into_owned()])
            .map_err(|r| anyhow::anyhow!("{file}: not a cacheable compile ({})", r.name()))?;
        let search = SearchPath::of(&c, &id, &env);
        let scan = || closure::scan(&c, &search, &root);
        let files = scan()?.files.len();
        let mut times: Vec<Duration> = (0..300)
            .map(|_| {
                let start = Instant::now();
                let _ = scan();
                start.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "{name} {file}: {files} files, min {:?}, median {:?}",
            times[0],
            times[times.len() / 2]
        );
    }
    Ok(())
}
