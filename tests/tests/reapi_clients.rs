//! kiln's remote tier over the Remote Execution API (`KILN_REMOTE_CACHE=grpc://…`), against
//! kiln-cache's REAPI services: a second machine served, the documented layout, big entries
//! through ByteStream, missing blobs, dead servers and refused tokens.

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use kiln_client::remote::{Entry, Remote};
use kiln_tests::{ok, require, shared, CacheServer, Project};
use prost::Message as _;
use sha2::Digest as _;

fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        size_bytes: data.len() as i64,
    }
}

/// The action digest of a kiln entry, built here from the layout ARCHITECTURE.md documents.
fn documented_action(kind: &str, key: &kiln_cache::Digest) -> re::Digest {
    let command = re::Command {
        arguments: vec![
            "kiln-entry".into(),
            "layout-1".into(),
            kind.into(),
            key.to_hex(),
        ],
        output_paths: vec!["entry".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = re::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(b"")),
        ..Default::default()
    }
    .encode_to_vec();
    digest(&action)
}

/// kiln's remote tier as a compile would make it, from these settings.
fn remote(dir: &std::path::Path, settings: &[(&str, &str)]) -> Remote {
    let mut pairs = vec![("KILN_DIR", dir.to_str().unwrap())];
    pairs.extend_from_slice(settings);
    let env = kiln_client::env::Env::from_pairs(pairs);
    let cfg = kiln_client::config::Config::load(&env, &Default::default()).unwrap();
    Remote::from_config(&cfg).expect("a remote tier")
}

fn reapi_metric(server: &CacheServer, name: &str) -> f64 {
    server
        .metrics()
        .get(&format!("{name}{{protocol=\"reapi\"}}"))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn kiln_over_reapi_serves_a_second_machine() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let url = format!("grpc://{}", server.addr);
    let machine = || shared::machine(&url, &[("KILN_REMOTE_INSTANCE", "team/ci")]);
    let args = shared::ARGS;
    let a = machine();
    let config = String::from_utf8(ok(&a.kiln(&["config"])).stdout.clone()).unwrap();
    assert!(
        config.contains(&url) && config.contains("team/ci"),
        "{config}"
    );
    shared::stores(&a);
    // The entries went in through REAPI, not kiln's own protocol.
    assert!(reapi_metric(&server, "kiln_cache_puts_total") >= 6.0);

    let b = machine();
    shared::is_served(&b);
    // Another instance name is another cache.
    let mut c = machine();
    c.env
        .push(("KILN_REMOTE_INSTANCE".into(), "team/other".into()));
    ok(&c.kiln(&args));
    assert_eq!(c.stats()["remote_hits"], 0);
    // With KILN_NO_PUSH a machine reads but never writes.
    let mut d = machine();
    d.env.push(("KILN_NO_PUSH".into(), "1".into()));
    d.write("src/m.c", "int other(void) { return 7; }\n");
    kiln_tests::settle();
    ok(&d.kiln(&args));
    assert_eq!(d.stats()["remote_uploads"], 0);
}

#[test]
fn entries_follow_the_documented_layout_and_big_ones_go_through_bytestream() {
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("grpc://{}", server.addr);
    let r = remote(dir.path(), &[("KILN_REMOTE_CACHE", &url)]);
    let key = kiln_cache::Hasher::new("test").str("small").finish();
    assert_eq!(r.get(Entry::Result, &key).unwrap(), None);
    let body = b"a small entry".to_vec();
    assert!(r.put(Entry::Result, &key, &body).unwrap());
    assert_eq!(r.get(Entry::Result, &key).unwrap(), Some(body.clone()));
    assert_eq!(r.get(Entry::Manifest, &key).unwrap(), None, "kinds apart");

    // What a REAPI client that knows nothing of kiln finds there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let result = re::action_cache_client::ActionCacheClient::new(ch.clone())
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(documented_action("result", &key)),
                inline_output_files: vec!["entry".into()],
                ..Default::default()
            })
            .await
            .expect("the entry is under the documented action")
            .into_inner();
        assert_eq!(result.exit_code, 0);
        assert_eq!(result.output_files.len(), 1);
        assert_eq!(result.output_files[0].path, "entry");
        assert_eq!(result.output_files[0].digest, Some(digest(&body)));
        assert_eq!(result.output_files[0].contents, body, "inlined as asked");
        // The action and its command are in the CAS too, so the entry names itself.
        let mut cas =
            re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
        let missing = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![documented_action("result", &key), digest(&body)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert!(missing.is_empty(), "{missing:?}");
    });

    // Larger than a batch: written and read through ByteStream, and still identical.
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let big_key = kiln_cache::Hasher::new("test").str("big").finish();
    let writes_before = reapi_metric(&server, "kiln_cache_puts_total");
    assert!(r.put(Entry::GoOutput, &big_key, &big).unwrap());
    assert_eq!(r.get(Entry::GoOutput, &big_key).unwrap(), Some(big));
    assert_eq!(
        reapi_metric(&server, "kiln_cache_puts_total") - writes_before,
        4.0,
        "command, action, body, action result"
    );
}

#[test]
fn an_entry_whose_blob_is_missing_is_a_miss() {
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let r = remote(
        dir.path(),
        &[("KILN_REMOTE_CACHE", &format!("grpc://{}", server.addr))],
    );
    // An action result naming a blob nobody uploaded, put in through Bazel's HTTP protocol
    // (which shares the empty instance and takes action results as they come).
    let key = kiln_cache::Hasher::new("test").str("orphan").finish();
    let orphan = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "entry".into(),
            digest: Some(digest(b"never uploaded")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let action = documented_action("result", &key);
    let (status, _) = server.request(
        "PUT",
        &format!("/ac/{}", action.hash),
        &orphan.encode_to_vec(),
    );
    assert_eq!(status, 200);
    assert_eq!(r.get(Entry::Result, &key).unwrap(), None);
    // A miss, not a failure: the server is still asked.
    let other = kiln_cache::Hasher::new("test").str("other").finish();
    assert!(r.put(Entry::Result, &other, b"x").unwrap());
    assert_eq!(r.get(Entry::Result, &other).unwrap(), Some(b"x".to_vec()));
}

#[test]
fn a_dead_reapi_server_is_skipped() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let url = format!("grpc://{}", server.addr);
    drop(server);
    let p = Project::with_remote(&url);
    p.write("a.c", "int a(void) { return 1; }\n");
    kiln_tests::settle();
    let args = ["gcc", "-c", "a.c", "-o", "a.o"];
    let out = ok(&p.kiln(&args)).clone();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.stats()["remote_errors"], 1);
    let _ = std::fs::remove_file(p.path("a.o"));
    ok(&p.kiln(&args));
    assert_eq!(
        p.stats()["remote_errors"],
        1,
        "a failed server is left alone for a while"
    );
    assert_eq!(p.stats()["hits"], 1);
}

#[test]
fn a_refused_token_is_a_counted_error_and_the_build_goes_on() {
    require("gcc");
    let secrets = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(secrets.path(), &[]).unwrap();
    let s = |name: &str| secrets.path().join(name).display().to_string();
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(
        store.path(),
        &[
            "--tls-cert",
            &s("server.pem"),
            "--tls-key",
            &s("server.key"),
            "--tokens",
            &s("client-tokens"),
        ],
    );
    let url = format!("grpcs://{}", server.addr);
    let machine = |token: &str| {
        let mut p = Project::with_remote(&url);
        p.env.push(("KILN_CA_FILE".into(), s("ca.pem")));
        p.env.push(("KILN_TOKEN_FILE".into(), token.to_owned()));
        p.env.push(("KILN_LOG".into(), "warn".into()));
        p.write("a.c", "int a(void) { return 2; }\n");
        kiln_tests::settle();
        p
    };
    let args = ["gcc", "-c", "a.c", "-o", "a.o"];
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-token\n").unwrap();
    let p = machine(wrong.path().to_str().unwrap());
    let out = ok(&p.kiln(&args)).clone();
    assert!(p.path("a.o").exists());
    assert_eq!(p.stats()["remote_errors"], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&url)
            && stderr.contains("Unauthenticated")
            && stderr.contains("KILN_TOKEN_FILE"),
        "{stderr}"
    );
    // The right token over TLS stores, and a second machine is served.
    let a = machine(&s("client.token"));
    ok(&a.kiln(&args));
    assert_eq!(a.stats()["remote_uploads"], 2, "{}", a.stats());
    let b = machine(&s("client.token"));
    b.kiln_matches_bare(&args, "a.o");
    assert_eq!(b.stats()["remote_hits"], 1);
}

/// A BuildGrid server (`bgd server start`) offering CAS, ByteStream and the action cache on
/// 127.0.0.1, its blobs on disk; killed when dropped.
struct Buildgrid {
    child: std::process::Child,
    url: String,
    storage: tempfile::TempDir,
}

impl Buildgrid {
    fn start() -> Buildgrid {
        require("bgd");
        let storage = tempfile::tempdir().unwrap();
        // bgd takes a port, not a listener: one the system just handed out and let go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = storage.path().join("bgd.yml");
        std::fs::write(
            &config,
            format!(
                "server:\n  - !channel\n    address: \"127.0.0.1:{port}\"\n    insecure-mode: true\n\
                 authorization:\n  method: none\n\
                 storages:\n  - !disk-storage &cas\n    path: {}\n\
                 caches:\n  - !lru-action-cache &ac\n    storage: *cas\n    max-cached-refs: 100000\n    allow-updates: true\n    cache-failed-actions: true\n\
                 instances:\n  - name: \"\"\n    services:\n      - !action-cache\n        cache: *ac\n      - !cas\n        storage: *cas\n      - !bytestream\n        storage: *cas\n",
                storage.path().join("blobs").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("bgd")
            .args(["server", "start"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start bgd server");
        let url = format!("http://127.0.0.1:{port}");
        // Ready when its Capabilities service answers.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ready = rt.block_on(async {
            for _ in 0..600 {
                if let Ok(ch) = tonic::transport::Channel::from_shared(url.clone())
                    .unwrap()
                    .connect()
                    .await
                {
                    let caps = re::capabilities_client::CapabilitiesClient::new(ch)
                        .get_capabilities(re::GetCapabilitiesRequest::default())
                        .await;
                    if caps.is_ok() {
                        return true;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            false
        });
        let mut server = Buildgrid {
            child,
            url,
            storage,
        };
        assert!(ready, "bgd server did not answer within 30 s");
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("bgd server exited: {status}");
        }
        server
    }

    /// Removes a blob from the server's disk storage; whether it was there.
    fn remove_blob(&self, hash: &str) -> bool {
        let mut found = false;
        let mut dirs = vec![self.storage.path().join("blobs")];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = e.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.file_name() == Some(std::ffi::OsStr::new(&hash[2..]))
                    && dir.file_name() == Some(std::ffi::OsStr::new(&hash[..2]))
                {
                    std::fs::remove_file(&path).unwrap();
                    found = true;
                }
            }
        }
        found
    }
}

impl Drop for Buildgrid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kiln_over_reapi_against_buildgrid() {
    require("gcc");
    let server = Buildgrid::start();
    let url = server.url.replacen("http://", "grpc://", 1);
    let machine = || shared::machine(&url, &[]);
    let args = shared::ARGS;
    let a = machine();
    shared::stores(&a);
    // A second machine with an empty local cache: served by BuildGrid, the object identical.
    let b = machine();
    shared::is_served(&b);

    // The result's body gone from BuildGrid's CAS (its action cache still names it): a miss
    // on a third machine, not an error, and a fresh compile.
    let results = a.entries('R');
    assert_eq!(results.len(), 1);
    let name = results[0].file_name().unwrap().to_str().unwrap();
    let shard: Vec<String> = results[0]
        .iter()
        .rev()
        .skip(1)
        .take(2)
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let key: kiln_cache::Digest = format!("{}{}{}", shard[1], shard[0], &name[..62])
        .parse()
        .unwrap();
    let store = kiln_cache::Store::open(&a.cache, Default::default());
    let kiln_cache::Lookup::Hit(body) = store.get(kiln_cache::Kind::Result, &key).unwrap() else {
        panic!("machine a's result is not in its cache");
    };
    assert!(server.remove_blob(&digest(&body).hash));
    let c = machine();
    c.kiln_matches_bare(&args, "m.o");
    let s = c.stats();
    assert_eq!(
        (
            s["misses"].as_i64(),
            s["remote_hits"].as_i64(),
            s["remote_errors"].as_i64()
        ),
        (Some(1), Some(0), Some(0)),
        "{s}"
    );
}

#[test]
fn buildgrid_cli_against_kiln_cache() {
    require("bgd");
    let p = Project::new();
    let server = CacheServer::start(&p.path("store"), &[]);
    let remote = format!("--remote={}", server.url());
    let bgd = |args: &[&str]| -> String {
        let out = ok(&p.command("bgd").args(args).output().unwrap()).clone();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    // Uploaded with `bgd cas upload-file`: a small file by batch, a big one by ByteStream.
    let small = b"an output of some action\n".to_vec();
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(p.path("small.txt"), &small).unwrap();
    std::fs::write(p.path("big.bin"), &big).unwrap();
    let log = bgd(&[
        "cas",
        &remote,
        "upload-file",
        "--verify",
        "small.txt",
        "big.bin",
    ]);
    for data in [&small, &big] {
        let d = digest(data);
        assert!(
            log.contains(&format!("digest=[{}/{}]", d.hash, d.size_bytes)),
            "{log}"
        );
    }
    // An action and its result, stored with `bgd actioncache update` (which reads the result
    // from the CAS).
    let action = re::Action {
        command_digest: Some(digest(b"a command")),
        input_root_digest: Some(digest(b"")),
        ..Default::default()
    }
    .encode_to_vec();
    let result = re::ActionResult {
        output_files: vec![
            re::OutputFile {
                path: "small.txt".into(),
                digest: Some(digest(&small)),
                ..Default::default()
            },
            re::OutputFile {
                path: "big.bin".into(),
                digest: Some(digest(&big)),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
    .encode_to_vec();
    std::fs::write(p.path("action.bin"), &action).unwrap();
    std::fs::write(p.path("result.bin"), &result).unwrap();
    bgd(&["cas", &remote, "upload-file", "action.bin", "result.bin"]);
    let name = |d: re::Digest| format!("{}/{}", d.hash, d.size_bytes);
    let (a, r) = (name(digest(&action)), name(digest(&result)));
    let missed = bgd(&["actioncache", &remote, "get", &a]);
    assert!(missed.contains("Miss"), "{missed}");
    bgd(&["actioncache", &remote, "update", &a, &r]);
    let found = bgd(&["actioncache", &remote, "get", "--json", &a]);
    assert!(
        found.contains(&digest(&small).hash) && found.contains(&digest(&big).hash),
        "{found}"
    );
    // Another instance name is another cache.
    let elsewhere = bgd(&["actioncache", &remote, "--instance-name=team", "get", &a]);
    assert!(elsewhere.contains("Miss"), "{elsewhere}");
    // Downloaded with `bgd cas download-file`, verified, identical.
    bgd(&[
        "cas",
        &remote,
        "download-file",
        "--verify",
        &name(digest(&small)),
        "out/small.txt",
        &name(digest(&big)),
        "out/big.bin",
    ]);
    assert_eq!(p.read("out/small.txt"), small);
    assert_eq!(p.read("out/big.bin"), big);
    assert!(reapi_metric(&server, "kiln_cache_hits_total") >= 3.0);
}

/// Bazel 2.1 (`bazel`, from npm) in a generated workspace of genrules, its server's memory
/// bounded, shut down when dropped.
struct Bazel<'p> {
    project: &'p Project,
    root: tempfile::TempDir,
}

/// Genrules in the workspace: chains of ten, each reading the one before.
const GENRULES: usize = 300;

impl<'p> Bazel<'p> {
    fn new(project: &'p Project) -> Bazel<'p> {
        require("bazel");
        project.write("ws/WORKSPACE", "");
        let mut build = String::new();
        for i in 0..GENRULES {
            if i % 10 == 0 {
                build.push_str(&format!(
                    "genrule(name = \"g{i}\", outs = [\"g{i}.txt\"], cmd = \"echo genrule {i} > $@\")\n"
                ));
            } else {
                build.push_str(&format!(
                    "genrule(name = \"g{i}\", srcs = [\":g{}\"], outs = [\"g{i}.txt\"], cmd = \"(cat $(SRCS); echo genrule {i}) > $@\")\n",
                    i - 1
                ));
            }
        }
        project.write("ws/BUILD", &build);
        Bazel {
            project,
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn bazel(&self, args: &[&str]) -> String {
        let out = self
            .project
            .command("bazel")
            .current_dir(self.project.path("ws"))
            .arg(format!("--output_user_root={}", self.root.path().display()))
            // A bounded heap, and a server that ends itself if this test cannot stop it.
            .args(["--host_jvm_args=-Xmx512m", "--max_idle_secs=300"])
            .args(args)
            .output()
            .expect("run bazel");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bazel {args:?} failed:\n{text}");
        text
    }

    /// Builds everything with these flags; returns what ran where ("300 remote cache hit").
    fn build(&self, flags: &[&str]) -> String {
        let mut args = vec!["build", "//...", "--spawn_strategy=standalone"];
        args.extend_from_slice(flags);
        let log = self.bazel(&args);
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("INFO: {GENRULES} processes: ")))
            .unwrap_or_else(|| panic!("no process summary in:\n{log}"))
            .trim_end_matches('.')
            .to_owned()
    }

    fn outputs(&self) -> Vec<Vec<u8>> {
        (0..GENRULES)
            .map(|i| self.project.read(&format!("ws/bazel-bin/g{i}.txt")))
            .collect()
    }
}

impl Drop for Bazel<'_> {
    fn drop(&mut self) {
        let _ = self
            .project
            .command("bazel")
            .current_dir(self.project.path("ws"))
            .arg(format!("--output_user_root={}", self.root.path().display()))
            .args([
                "--host_jvm_args=-Xmx512m",
                "--max_idle_secs=300",
                "shutdown",
            ])
            .output();
    }
}

#[test]
fn bazel_builds_against_kiln_cache_and_a_clean_rebuild_is_all_hits() {
    let p = Project::new();
    let bazel = Bazel::new(&p);
    let store = p.path("store");
    let server = CacheServer::start(&store, &[]);
    let plain = format!("--remote_cache=grpc://{}", server.addr);
    assert_eq!(
        bazel.build(&[&plain]),
        format!("{GENRULES} local"),
        "a cold cache runs everything"
    );
    let first = bazel.outputs();
    assert!(reapi_metric(&server, "kiln_cache_puts_total") >= 2.0 * GENRULES as f64);
    bazel.bazel(&["clean"]);
    let hits = reapi_metric(&server, "kiln_cache_hits_total");
    assert_eq!(
        bazel.build(&[&plain]),
        format!("{GENRULES} remote cache hit"),
        "nothing ran locally"
    );
    assert!(reapi_metric(&server, "kiln_cache_hits_total") - hits >= 2.0 * GENRULES as f64);
    assert_eq!(bazel.outputs(), first);
    drop(server);

    // The same store behind TLS, reads allowed only with a token (--private): Bazel's
    // certificate check and bearer header. (Bazel 2.1 sends --remote_header on its reads but
    // not on its uploads, so the uploads above went over plain text.)
    let secrets = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(secrets.path(), &[]).unwrap();
    let s = |name: &str| secrets.path().join(name).display().to_string();
    let server = CacheServer::start(
        &store,
        &[
            "--tls-cert",
            &s("server.pem"),
            "--tls-key",
            &s("server.key"),
            "--tokens",
            &s("client-tokens"),
            "--private",
        ],
    );
    let port = server.addr.rsplit(':').next().unwrap();
    let token = std::fs::read_to_string(s("client.token")).unwrap();
    bazel.bazel(&["clean"]);
    assert_eq!(
        bazel.build(&[
            &format!("--remote_cache=grpcs://localhost:{port}"),
            &format!("--tls_certificate={}", s("ca.pem")),
            &format!("--remote_header=Authorization=Bearer {}", token.trim()),
        ]),
        format!("{GENRULES} remote cache hit"),
        "nothing ran locally"
    );
    assert_eq!(bazel.outputs(), first);
}

#[test]
fn a_farm_result_is_stored_through_reapi() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let url = format!("grpc://{}", server.addr);
    let farm = kiln_tests::Farm::start(1, 1);
    farm.wait_for_builders(1);
    let write = |p: &Project| {
        p.write("f.c", "int f(int x) { return x * 11; }\n");
        kiln_tests::settle();
    };
    let args = ["gcc", "-c", "f.c", "-o", "f.o", "-O2"];
    // Compiled on the farm, stored in the REAPI cache by the client.
    let mut a = farm.project();
    a.env.push(("KILN_REMOTE_CACHE".into(), url.clone()));
    write(&a);
    ok(&a.kiln(&args));
    let s = a.stats();
    assert_eq!(
        (s["dist_compiles"].as_i64(), s["remote_uploads"].as_i64()),
        (Some(1), Some(2)),
        "{s}"
    );
    // Another machine, no farm: served from the REAPI cache.
    let b = Project::with_remote(&url);
    write(&b);
    b.kiln_matches_bare(&args, "f.o");
    assert_eq!(b.stats()["remote_hits"], 1, "{}", b.stats());
}
