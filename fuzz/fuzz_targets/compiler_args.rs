//! `kiln_client::args`: the classification of a compiler command line, and the expansion of a
//! response file. The input is split into arguments on NUL bytes; when it starts with `@`, the
//! rest is instead the text of a response file, expanded first.
//!
//! Beyond never panicking, a cacheable `Compile` must describe its own command: it keeps the
//! arguments unchanged, its source is one of them, an explicit output or dependency file is
//! spelled in them, and classifying again gives the same answer.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use kiln_client::args::{classify, default_dep_file, dwo_path, expand_response_files};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = match data.strip_prefix(b"@") {
        Some(text) => match response_file(text) {
            Some(args) => args,
            None => return,
        },
        None => data
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect(),
    };
    let classified = classify(args.clone());
    assert_eq!(
        classified,
        classify(args.clone()),
        "classify is not a function"
    );
    let Ok(c) = classified else {
        return;
    };
    assert_eq!(c.args, args, "the command to run was changed");
    assert!(
        args.contains(&c.source),
        "source {:?} not in {args:?}",
        c.source
    );
    let spelled = |path: &Path| {
        let p = path.to_str().unwrap();
        args.iter()
            .any(|a| a == p || (a.len() > p.len() && a.ends_with(p)))
    };
    let mut derived = Path::new(&c.source)
        .file_stem()
        .unwrap_or_default()
        .to_os_string();
    derived.push(if c.assembly { ".s" } else { ".o" });
    assert!(
        spelled(&c.output) || c.output == derived,
        "output {:?} neither given in {args:?} nor derived from the source",
        c.output
    );
    if let Some(dep) = &c.dep_file {
        let output = c.output.to_str();
        let default = [output, None].map(|o| default_dep_file(o, &c.source));
        assert!(
            spelled(&dep.path) || (dep.add_mf && default.contains(&dep.path)),
            "dependency file {:?} not given in {args:?}",
            dep.path
        );
    }
    let _ = dwo_path(&c.output);
});

/// Expands `@rsp` with `text` as that file, in a directory of its own. Texts that could name a
/// file elsewhere (a `/` anywhere, with an `@`) are skipped: `@/dev/zero` would only test the
/// machine.
fn response_file(text: &[u8]) -> Option<Vec<String>> {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    if text.contains(&b'@') && text.contains(&b'/') {
        return None;
    }
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    std::fs::write(dir.join("rsp"), text).unwrap();
    expand_response_files(&["@rsp".to_string()], dir).ok()
}
