//! `kiln go-cacheprog`: Go's cache program (`GOCACHEPROG`, Go 1.24 and later) over kiln's store.
//!
//! cmd/go starts the program, reads `{"ID":0,"KnownCommands":[...]}`, then sends one JSON
//! request per line (each followed by a blank line), a `put`'s body on its own line as a JSON
//! string of base64. IDs are base64 too. Answers may come in any order; this one answers in
//! order, each as it is read.
//!
//! - An *action* (`ActionID`) maps to an output (`OutputID`, the SHA-256 of the body, as
//!   cmd/go computes it), its size and time: an [`Kind::Action`] entry, checksummed like every
//!   entry.
//! - The body is a plain file with no extension ([`Kind::Raw`]), because cmd/go reads the
//!   `DiskPath` it is given directly. It is written once, through a temporary file and a rename,
//!   and its BLAKE3 and stat are kept in the action entry: a body whose stat changed is hashed
//!   again, and served only if it still matches.
//! - With a remote tier (`KILN_REMOTE_CACHE`), a local miss asks the server for the action and
//!   its body (checked against the recorded digest before it is kept), and puts are pushed, so a
//!   second machine's first build is served from the shared cache.

use std::io::{BufRead, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kiln_cache::{Digest, Hasher, Kind, Limits, Lookup, Store};
use serde::{Deserialize, Serialize};

use crate::codec::{Reader, Writer};
use crate::config::Config;
use crate::files::{self, Stat};
use crate::remote::{self, Remote};

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "Command")]
    command: String,
    #[serde(rename = "ActionID", default)]
    action_id: Option<String>,
    #[serde(rename = "OutputID", default)]
    output_id: Option<String>,
    /// What Go 1.21 to 1.23 called `OutputID` in a put.
    #[serde(rename = "ObjectID", default)]
    object_id: Option<String>,
    #[serde(rename = "BodySize", default)]
    body_size: i64,
}

#[derive(Debug, Default, Serialize)]
struct Response {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "Err", skip_serializing_if = "String::is_empty")]
    err: String,
    #[serde(rename = "KnownCommands", skip_serializing_if = "Vec::is_empty")]
    known_commands: Vec<&'static str>,
    #[serde(rename = "Miss", skip_serializing_if = "std::ops::Not::not")]
    miss: bool,
    #[serde(rename = "OutputID", skip_serializing_if = "Option::is_none")]
    output_id: Option<String>,
    #[serde(rename = "Size", skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(rename = "Time", skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(rename = "DiskPath", skip_serializing_if = "Option::is_none")]
    disk_path: Option<String>,
}

/// What one session did, for `kiln stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub gets: i64,
    pub hits: i64,
    pub puts: i64,
    /// What was done with the remote tier.
    pub remote: remote::Counts,
}

/// An action's record.
#[derive(Debug, PartialEq, Eq)]
struct ActionRecord {
    output_id: Vec<u8>,
    size: u64,
    time_ns: i64,
    body: Digest,
    stat: Stat,
}

impl ActionRecord {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&self.output_id);
        w.u64(self.size);
        w.i64(self.time_ns);
        w.digest(&self.body);
        w.u64(self.stat.size);
        w.i64(self.stat.mtime_ns);
        w.i64(self.stat.ctime_ns);
        w.u64(self.stat.ino);
        w.u64(self.stat.dev);
        w.0
    }

    fn decode(bytes: &[u8]) -> Option<ActionRecord> {
        let mut r = Reader(bytes);
        let rec = ActionRecord {
            output_id: r.bytes()?.to_vec(),
            size: r.u64()?,
            time_ns: r.i64()?,
            body: r.digest()?,
            stat: Stat {
                size: r.u64()?,
                mtime_ns: r.i64()?,
                ctime_ns: r.i64()?,
                ino: r.u64()?,
                dev: r.u64()?,
            },
        };
        r.is_empty().then_some(rec)
    }
}

fn action_key(action_id: &[u8]) -> Digest {
    Hasher::new("kiln go action v1").field(action_id).finish()
}

fn output_key(output_id: &[u8]) -> Digest {
    Hasher::new("kiln go output v1").field(output_id).finish()
}

/// Serves cmd/go on `input`/`output` until `close` or the end of input.
pub fn serve(
    config: &Config,
    mut input: impl BufRead,
    mut output: impl Write,
) -> anyhow::Result<Counts> {
    let store = Store::open(
        &config.dir,
        Limits {
            max_size: config.max_size,
            max_files: config.max_files,
        },
    );
    let remote = Remote::from_config(config);
    // A read-only cache declares no `put`: cmd/go then keeps its outputs to itself.
    let known = if config.read_only {
        vec!["get", "close"]
    } else {
        vec!["get", "put", "close"]
    };
    send(
        &mut output,
        &Response {
            id: 0,
            known_commands: known,
            ..Response::default()
        },
    )?;
    let mut counts = Counts::default();
    let mut line = String::new();
    loop {
        line.clear();
        if input
            .read_line(&mut line)
            .context("cannot read from cmd/go")?
            == 0
        {
            return Ok(counts);
        }
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = serde_json::from_str(&line)
            .with_context(|| format!("malformed request from cmd/go: {:.200}", line.trim()))?;
        let response = match req.command.as_str() {
            "get" => {
                counts.gets += 1;
                let r = get(&store, remote.as_ref(), &mut counts.remote, &req);
                if !r.miss && r.err.is_empty() {
                    counts.hits += 1;
                }
                r
            }
            "put" if !config.read_only => {
                let body = read_body(&mut input, req.body_size)?;
                counts.puts += 1;
                put(&store, remote.as_ref(), &mut counts.remote, &req, &body)
            }
            "close" => {
                send(
                    &mut output,
                    &Response {
                        id: req.id,
                        ..Response::default()
                    },
                )?;
                return Ok(counts);
            }
            other => Response {
                id: req.id,
                err: format!("kiln: unknown command {other:?}"),
                ..Response::default()
            },
        };
        send(&mut output, &response)?;
    }
}

fn send(output: &mut impl Write, r: &Response) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec(r)?;
    text.push(b'\n');
    output.write_all(&text).context("cannot write to cmd/go")?;
    output.flush().context("cannot write to cmd/go")
}

/// The body line of a put: a JSON string of base64, `size` bytes once decoded. No line at all
/// when the body is empty.
fn read_body(input: &mut impl BufRead, size: i64) -> anyhow::Result<Vec<u8>> {
    if size <= 0 {
        return Ok(Vec::new());
    }
    let mut line = String::new();
    while line.trim().is_empty() {
        line.clear();
        if input
            .read_line(&mut line)
            .context("cannot read a put body from cmd/go")?
            == 0
        {
            bail!("cmd/go closed its pipe in the middle of a put");
        }
    }
    let text: String =
        serde_json::from_str(line.trim()).context("a put body is not a JSON string")?;
    let body = B64.decode(text).context("a put body is not base64")?;
    if body.len() as i64 != size {
        bail!(
            "a put body has {} bytes, not the {size} announced",
            body.len()
        );
    }
    Ok(body)
}

fn decode_id(field: Option<&String>, name: &str) -> Result<Vec<u8>, String> {
    let text = field
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("kiln: the request has no {name}"))?;
    B64.decode(text)
        .map_err(|e| format!("kiln: {name} is not base64: {e}"))
}

fn get(store: &Store, remote: Option<&Remote>, rc: &mut remote::Counts, req: &Request) -> Response {
    let miss = Response {
        id: req.id,
        miss: true,
        ..Response::default()
    };
    let action = match decode_id(req.action_id.as_ref(), "ActionID") {
        Ok(a) => a,
        Err(err) => {
            return Response {
                id: req.id,
                err,
                ..Response::default()
            }
        }
    };
    let key = action_key(&action);
    let rec = match store.get(Kind::Action, &key) {
        Ok(Lookup::Hit(bytes)) => match ActionRecord::decode(&bytes) {
            Some(r) => r,
            None => return miss,
        },
        _ => match remote.and_then(|r| fetch_remote(store, r, rc, &key)) {
            Some(r) => r,
            None => return miss,
        },
    };
    let path = store.path_of(Kind::Raw, &output_key(&rec.output_id));
    let verified = match files::stat(&path) {
        Ok(st) if st == rec.stat => true,
        // Changed since kiln wrote it: serve it only if it still holds the same bytes.
        Ok(_) => match files::hash_file(&path) {
            Ok(h) if h.digest == rec.body && h.stat.size == rec.size => true,
            _ => {
                tracing::warn!(path = %path.display(), "removing a damaged Go cache body");
                let _ = store.remove(Kind::Raw, &output_key(&rec.output_id));
                false
            }
        },
        Err(_) => false,
    };
    let rec = if verified {
        rec
    } else {
        // The body was evicted or damaged here: the server may still have it.
        match remote.and_then(|r| fetch_remote(store, r, rc, &key)) {
            Some(r) => r,
            None => return miss,
        }
    };
    let path = store.path_of(Kind::Raw, &output_key(&rec.output_id));
    Response {
        id: req.id,
        output_id: Some(B64.encode(&rec.output_id)),
        size: Some(rec.size),
        time: Some(rfc3339(rec.time_ns)),
        disk_path: Some(path.to_string_lossy().into_owned()),
        ..Response::default()
    }
}

/// An action and its body from the remote tier, checked and kept in the local store.
fn fetch_remote(
    store: &Store,
    remote: &Remote,
    rc: &mut remote::Counts,
    key: &Digest,
) -> Option<ActionRecord> {
    let mut fetch = |kind, key: &Digest| match remote.get(kind, key) {
        Ok(found) => found,
        Err(_) => {
            rc.errors += 1;
            None
        }
    };
    let theirs = ActionRecord::decode(&fetch(remote::Entry::GoAction, key)?)?;
    let body = fetch(remote::Entry::GoOutput, &output_key(&theirs.output_id))?;
    if Digest::of(&body) != theirs.body || body.len() as u64 != theirs.size {
        tracing::warn!("the remote cache sent a Go output that does not match its record");
        return None;
    }
    let path = store.put_raw(&output_key(&theirs.output_id), &body).ok()?;
    let rec = ActionRecord {
        stat: files::stat(&path).ok()?,
        ..theirs
    };
    store.put(Kind::Action, key, &rec.encode()).ok()?;
    rc.hits += 1;
    Some(rec)
}

fn put(
    store: &Store,
    remote: Option<&Remote>,
    rc: &mut remote::Counts,
    req: &Request,
    body: &[u8],
) -> Response {
    let fail = |err: String| Response {
        id: req.id,
        err,
        ..Response::default()
    };
    let action = match decode_id(req.action_id.as_ref(), "ActionID") {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    // Go 1.24+ sends OutputID; older toolchains sent ObjectID.
    let output = match decode_id(
        req.output_id
            .as_ref()
            .filter(|o| !o.is_empty())
            .or(req.object_id.as_ref()),
        "OutputID",
    ) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let stored = (|| -> anyhow::Result<String> {
        let path = store.put_raw(&output_key(&output), body)?;
        let stat = files::stat(&path)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let rec = ActionRecord {
            output_id: output.clone(),
            size: body.len() as u64,
            time_ns: now,
            body: Digest::of(body),
            stat,
        };
        let record = rec.encode();
        store.put(Kind::Action, &action_key(&action), &record)?;
        if let Some(remote) = remote {
            // The body first: a record on the server always has its body there.
            let pushed = remote
                .put(remote::Entry::GoOutput, &output_key(&output), body)
                .and_then(|_| remote.put(remote::Entry::GoAction, &action_key(&action), &record));
            match pushed {
                Ok(true) => rc.uploads += 1,
                Ok(false) => {}
                Err(_) => rc.errors += 1,
            }
        }
        Ok(path.to_string_lossy().into_owned())
    })();
    match stored {
        Ok(disk_path) => Response {
            id: req.id,
            disk_path: Some(disk_path),
            ..Response::default()
        },
        Err(e) => fail(format!("kiln: cannot store a Go cache entry: {e:#}")),
    }
}

/// `2026-11-22T05:40:01.123456789Z` from nanoseconds since the epoch.
fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::env::Env;

    fn config(dir: &std::path::Path) -> Config {
        Config::load(
            &Env::from_pairs([("KILN_DIR", dir.to_str().unwrap())]),
            &Overrides::default(),
        )
        .unwrap()
    }

    fn b64(b: &[u8]) -> String {
        B64.encode(b)
    }

    fn session(cfg: &Config, script: &str) -> (Vec<serde_json::Value>, Counts) {
        let mut out = Vec::new();
        let counts = serve(cfg, script.as_bytes(), &mut out).unwrap();
        let replies = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (replies, counts)
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339(1_795_329_601_500_000_000),
            "2026-11-22T06:40:01.500000000Z"
        );
    }

    #[test]
    fn handshake_put_get_close() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (action, output, body) = (b64(&[1; 32]), b64(&[2; 32]), b"package archive".to_vec());
        let script = format!(
            "{{\"ID\":1,\"Command\":\"get\",\"ActionID\":\"{action}\"}}\n\n\
             {{\"ID\":2,\"Command\":\"put\",\"ActionID\":\"{action}\",\"OutputID\":\"{output}\",\"BodySize\":{}}}\n\n\"{}\"\n\
             {{\"ID\":3,\"Command\":\"get\",\"ActionID\":\"{action}\"}}\n\n\
             {{\"ID\":4,\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\",\"BodySize\":0}}\n\n\
             {{\"ID\":5,\"Command\":\"close\"}}\n\n",
            body.len(),
            b64(&body),
            b64(&[3; 32]),
            b64(&[4; 32]),
        );
        let (replies, counts) = session(&cfg, &script);
        assert_eq!(
            replies[0],
            serde_json::json!({"ID": 0, "KnownCommands": ["get", "put", "close"]})
        );
        assert_eq!(replies[1], serde_json::json!({"ID": 1, "Miss": true}));
        let disk = replies[2]["DiskPath"].as_str().unwrap();
        let disk_path = std::path::Path::new(disk);
        assert!(
            disk_path.is_absolute() && disk_path.extension().is_none(),
            "{disk}"
        );
        assert_eq!(std::fs::read(disk).unwrap(), body);
        assert_eq!(replies[3]["OutputID"], output);
        assert_eq!(replies[3]["Size"], body.len());
        assert_eq!(replies[3]["DiskPath"], disk);
        assert!(replies[3]["Time"].as_str().unwrap().ends_with('Z'));
        // An empty body is legal and has no body line.
        assert!(replies[4]["DiskPath"].is_string());
        assert_eq!(replies[5], serde_json::json!({"ID": 5}));
        assert_eq!((counts.gets, counts.hits, counts.puts), (2, 1, 2));
    }

    #[test]
    fn old_object_id_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (action, output) = (b64(&[5; 32]), b64(&[6; 32]));
        let put = format!(
            "{{\"ID\":1,\"Command\":\"put\",\"ActionID\":\"{action}\",\"ObjectID\":\"{output}\",\"BodySize\":3}}\n\"{}\"\n",
            b64(b"abc")
        );
        let (replies, _) = session(&cfg, &put);
        let disk = replies[1]["DiskPath"].as_str().unwrap().to_owned();
        let get = format!("{{\"ID\":2,\"Command\":\"get\",\"ActionID\":\"{action}\"}}\n");
        let (replies, _) = session(&cfg, &get);
        assert_eq!(replies[1]["OutputID"], output);
        // Same size, other bytes: the stat changed, the digest does not match, so a miss.
        std::fs::write(&disk, b"xyz").unwrap();
        let (replies, counts) = session(&cfg, &get);
        assert_eq!(replies[1]["Miss"], true);
        assert_eq!(counts.hits, 0);
        assert!(!std::path::Path::new(&disk).exists());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let mut out = Vec::new();
        assert!(serve(&cfg, "{not json\n".as_bytes(), &mut out).is_err());
        let short = format!("{{\"ID\":1,\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\",\"BodySize\":9}}\n\"{}\"\n", b64(&[1; 32]), b64(&[2; 32]), b64(b"abc"));
        assert!(serve(&cfg, short.as_bytes(), &mut Vec::new()).is_err());
        let (replies, _) = session(
            &cfg,
            "{\"ID\":7,\"Command\":\"get\",\"ActionID\":\"!!\"}\n{\"ID\":8,\"Command\":\"frob\"}\n",
        );
        assert!(replies[1]["Err"].as_str().unwrap().contains("base64"));
        assert!(replies[2]["Err"].as_str().unwrap().contains("frob"));
    }
}
