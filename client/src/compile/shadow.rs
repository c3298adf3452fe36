//! Shadowing: the places where a header of the same name would have been found first, had it
//! existed, and the names `__has_include` tested. A manifest records them, so a later lookup
//! misses when a new file would change what the compile reads.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::c_family::CCompile;
use super::Invocation;
use crate::closure::Probe;
use crate::files;
use crate::manifest::DirRecord;

/// The directory of a path as given, `.` for a bare name.
pub(super) fn parent_of(path: &str) -> String {
    match Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => normalize(&p.to_string_lossy()),
        _ => ".".to_owned(),
    }
}

pub(super) fn normalized(dirs: &[String]) -> Vec<String> {
    dirs.iter().map(|d| normalize(d)).collect()
}

pub(super) fn under_any(path: &str, dirs: &[String]) -> bool {
    let path = normalize(path);
    dirs.iter().any(|d| {
        path.strip_prefix(d.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Lexical normal form of a path: no `.` components, no repeated or trailing slashes.
pub(super) fn normalize(p: &str) -> String {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        if c != Component::CurDir {
            out.push(c.as_os_str());
        }
    }
    let s = out.to_string_lossy().into_owned();
    if s.is_empty() {
        ".".to_owned()
    } else {
        s
    }
}

/// Paths where a header of the same name would have been found first, had it existed: for each
/// header, the directories before its own on the include path. Only paths absent now are
/// recorded (one present now was passed over for a reason, such as an include relative to the
/// including file), so a later lookup fails when a new file could shadow a used one. Each is
/// cut back to its first missing component (see [`first_missing`]).
#[allow(clippy::type_complexity)]
pub(super) fn negative_paths(
    inv: &Invocation,
    p: &CCompile,
    headers: &[String],
    probes: &[(String, Probe)],
) -> (Vec<(String, Option<DirRecord>)>, Vec<String>) {
    const MAX: usize = 4096;
    let c = &p.compile;
    let source_dir = Path::new(&c.source)
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let chain: Vec<String> = std::iter::once(&source_dir)
        .chain(p.search.all())
        .map(|d| normalize(d))
        .collect();
    // `#include "x"` looks in the including file's directory first, and `-include` in the
    // working directory: every such directory could gain a header that shadows a used one.
    let mut includers: Vec<String> = Vec::new();
    let has_forced_include = !c.preprocessor.includes.is_empty();
    let system_headers = normalized(&p.search.system);
    let project_headers = headers.iter().filter(|h| !under_any(h, &system_headers));
    for d in project_headers
        .map(|h| parent_of(h))
        .chain(std::iter::once(normalize(&source_dir)))
    {
        if !includers.contains(&d) {
            includers.push(d);
        }
    }
    if has_forced_include && !includers.iter().any(|d| d == ".") {
        includers.push(".".to_owned());
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut parents = std::collections::HashMap::new();
    let mut existence = std::collections::HashMap::new();
    for h in headers {
        let h = normalize(h);
        // The most specific directory of the chain that holds this header.
        let found = chain
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let rest = if d == "." {
                    Some(h.as_str()).filter(|h| !h.starts_with('/'))
                } else {
                    h.strip_prefix(d.as_str()).and_then(|r| r.strip_prefix('/'))
                };
                rest.map(|r| (i, d.len(), r))
            })
            .max_by_key(|(i, len, _)| (*len, std::cmp::Reverse(*i)));
        let Some((idx, _, rest)) = found else {
            continue;
        };
        let own = &chain[idx];
        for earlier in chain[..idx].iter().chain(&includers) {
            if earlier == own {
                continue;
            }
            if let Some(missing) = first_missing(&inv.cwd, earlier, rest, &mut existence) {
                if seen.insert(missing.clone()) {
                    let parent = dir_record(&inv.cwd, &missing, &mut parents);
                    out.push((missing, parent));
                    if out.len() >= MAX {
                        return (out, Vec::new());
                    }
                }
            }
        }
    }
    // Names tested by `__has_include`: every place along the search path where the name is
    // found must stay, every place where it is not must stay empty.
    let mut positives = Vec::new();
    for (includer, probe) in probes {
        let dirs: Vec<&String> = if probe.name.starts_with('/') {
            Vec::new()
        } else if probe.quoted {
            std::iter::once(includer).chain(&chain).collect()
        } else {
            chain.iter().collect()
        };
        let mut places: Vec<(String, String)> = dirs
            .into_iter()
            .map(|d| {
                let place = if d == "." {
                    probe.name.clone()
                } else {
                    format!("{d}/{}", probe.name)
                };
                (d.clone(), place)
            })
            .collect();
        if probe.name.starts_with('/') {
            places.push(("/".into(), probe.name.clone()));
        }
        for (dir, place) in places {
            if fs::metadata(inv.cwd.join(&place)).is_ok() {
                if !positives.contains(&place) {
                    positives.push(place);
                }
            } else if dir == "/" {
                if seen.insert(place.clone()) {
                    out.push((place, None));
                }
            } else if let Some(missing) = first_missing(
                &inv.cwd,
                &dir,
                place.strip_prefix(&format!("{dir}/")).unwrap_or(&place),
                &mut existence,
            ) {
                if seen.insert(missing.clone()) {
                    let parent = dir_record(&inv.cwd, &missing, &mut parents);
                    out.push((missing, parent));
                }
            }
        }
    }
    (out, positives)
}

/// The fingerprint of the directory `path` would appear in (memoized in `cache`).
pub(super) fn dir_record(
    cwd: &Path,
    path: &str,
    cache: &mut std::collections::HashMap<String, Option<DirRecord>>,
) -> Option<DirRecord> {
    let parent = match path.rsplit_once('/') {
        Some(("", _)) => "/".to_owned(),
        Some((p, _)) => p.to_owned(),
        None => ".".to_owned(),
    };
    cache
        .entry(parent.clone())
        .or_insert_with(|| {
            let stat = files::stat(&cwd.join(&parent)).ok()?;
            let age = files::nanos(SystemTime::now()) - stat.changed_ns();
            let stable = age >= files::TIMESTAMP_SLACK.as_nanos() as i64;
            Some(DirRecord {
                path: parent,
                stat,
                stable,
            })
        })
        .clone()
}

/// The shortest path under `dir` along `rest` that does not exist, if any. As long as it
/// stays absent, nothing below it can appear, so one `stat` covers a whole subtree: C++'s
/// `bits/*.h` in a directory without `bits/` is a single negative.
///
/// `seen` remembers what exists: headers share their first components (`bits/…`), so most
/// look-ups repeat.
pub(super) fn first_missing(
    cwd: &Path,
    dir: &str,
    rest: &str,
    seen: &mut std::collections::HashMap<String, bool>,
) -> Option<String> {
    let mut path = if dir == "." {
        String::new()
    } else {
        dir.to_owned()
    };
    for component in rest.split('/') {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(component);
        let exists = match seen.get(&path) {
            Some(e) => *e,
            None => {
                let e = fs::symlink_metadata(cwd.join(&path)).is_ok();
                seen.insert(path.clone(), e);
                e
            }
        };
        if !exists {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms() {
        assert_eq!(normalize("./include//a.h"), "include/a.h");
        assert_eq!(normalize(""), ".");
        assert_eq!(normalize("/usr/include/"), "/usr/include");
    }
}
