//! The farm as a security team would probe it: credentials (missing, wrong, of the other role,
//! rotated, limited), TLS (plain text to a TLS port, the wrong CA, mutual TLS), and hostile
//! requests against the real scheduler and builder (archives that escape, device nodes, setuid
//! bits, paths outside the jail, malformed and oversized messages). Each is refused with its
//! error, and the host and the farm are untouched.

use std::collections::HashMap;

use kiln_net::auth::Credential;
use kiln_proto::v1::{from_client, to_client, Chunk, FromClient, InputFile, JobSpec};
use kiln_proto::Digest;
use kiln_tests::sample::{project, HEADER};
use kiln_tests::{ok, Farm, Project};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn token(text: &str) -> Credential {
    Credential::Token(text.into())
}

#[test]
fn calls_without_the_right_token_are_refused_naming_the_credential() {
    let farm = Farm::start(1, 1);
    let client_token = Credential::File(farm.secret("client.token"));
    let builder_token = Credential::File(farm.secret("builder.token"));
    let spec = || FromClient {
        msg: Some(from_client::Msg::Spec(JobSpec {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            ..JobSpec::default()
        })),
    };
    runtime().block_on(async {
        let cases = [
            (
                Credential::None,
                tonic::Code::Unauthenticated,
                "no client token",
            ),
            (
                token("0123"),
                tonic::Code::Unauthenticated,
                "not in the scheduler's --client-tokens",
            ),
            (
                builder_token.clone(),
                tonic::Code::PermissionDenied,
                "is builder token \"builders\": jobs need a client token",
            ),
        ];
        for (credential, code, words) in cases {
            let mut client = farm.grpc_with(credential.clone()).await;
            let err = client
                .compile(tokio_stream::iter(vec![spec()]))
                .await
                .expect_err("a job without a client token was accepted");
            assert_eq!(err.code(), code, "{credential:?}: {err:?}");
            assert!(
                err.message().contains(words),
                "{credential:?}: {}",
                err.message()
            );
            let err = client
                .status(kiln_proto::v1::StatusRequest {})
                .await
                .map(|_| ())
                .err();
            match &credential {
                Credential::None => {
                    assert_eq!(err.map(|e| e.code()), Some(tonic::Code::Unauthenticated));
                }
                // The status names every builder and job: it is for clients only.
                c if *c == builder_token => {
                    let err = err.expect("a builder token read the status");
                    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
                    assert!(
                        err.message().contains(
                            "is builder token \"builders\": status calls need a client token"
                        ),
                        "{}",
                        err.message()
                    );
                }
                _ => {}
            }
        }
        // Nor does a builder's certificate, which needs no token to join.
        let certified = kiln_net::tls::ClientFiles {
            ca: Some(farm.secret("ca.pem")),
            identity: Some((farm.secret("builder.pem"), farm.secret("builder.key"))),
        };
        let channel = kiln_net::tls::endpoint(&farm.url(), &certified)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let err = kiln_proto::v1::scheduler_client::SchedulerClient::new(channel)
            .status(kiln_proto::v1::StatusRequest {})
            .await
            .expect_err("a builder's certificate read the status");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            err.message()
                .contains("a builder's certificate and no token: status calls need a client token"),
            "{}",
            err.message()
        );
        // A client's token does not make a builder.
        let mut client = farm.grpc_with(client_token).await;
        let register = kiln_proto::v1::FromBuilder {
            msg: Some(kiln_proto::v1::from_builder::Msg::Register(
                kiln_proto::v1::Register {
                    protocol_version: kiln_proto::PROTOCOL_VERSION,
                    name: "intruder".into(),
                    os: "linux".into(),
                    arch: "x86_64".into(),
                    slots: 8,
                    ..Default::default()
                },
            )),
        };
        let err = client
            .join(tokio_stream::iter(vec![register]))
            .await
            .expect_err("a client token joined as a builder");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message()
                .contains("is client token \"clients\": builders need a builder token"),
            "{}",
            err.message()
        );
    });
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 1);

    // kiln without a token compiles locally, and says why in its statistics.
    let mut p = project(&farm);
    p.env.retain(|(k, _)| k != "KILN_TOKEN_FILE");
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"]));
    assert!(p.path("main.o").exists());
    assert_eq!(
        p.stats()["dist_fallbacks_by_cause"]["refused"],
        1,
        "{}",
        p.stats()
    );
    assert_eq!(farm.status()["jobs_done"], 0);
}

#[test]
fn tls_refuses_plain_text_and_servers_signed_by_another_ca() {
    let farm = Farm::start(1, 1);
    let other = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(other.path(), &[]).unwrap();

    // Plain-text HTTP to the TLS port gets no answer at all.
    let (status, _) = std::panic::catch_unwind(|| {
        kiln_tests::http_request(&farm.addr.to_string(), "GET", "/", &[], b"")
    })
    .unwrap_or((0, Vec::new()));
    assert_eq!(status, 0, "a plain-text request was answered");

    let sample = |p: &Project, out: &str| {
        ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", out, "-Iinc"]));
        assert!(p.path(out).exists());
    };
    // A client speaking plain text to it, and one that trusts another farm's CA, both compile
    // locally: neither reached the scheduler.
    let mut p = project(&farm);
    for (k, v) in p.env.iter_mut() {
        if k == "KILN_SCHEDULER" {
            *v = format!("http://{}", farm.addr);
        }
    }
    sample(&p, "plain.o");
    let mut p = project(&farm);
    for (k, v) in p.env.iter_mut() {
        if k == "KILN_CA_FILE" {
            *v = other.path().join("ca.pem").display().to_string();
        }
    }
    sample(&p, "wrong-ca.o");
    assert_eq!(
        p.stats()["dist_fallbacks_by_cause"]["unreachable"],
        1,
        "{}",
        p.stats()
    );
    assert_eq!(farm.status()["jobs_done"], 0);

    // A builder that trusts another CA never joins; neither does one with no credential.
    let mut farm = farm;
    farm.start_builder_with(1, |c| c.tls.ca = Some(other.path().join("ca.pem")));
    farm.start_builder_with(2, |c| c.token = Credential::None);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let names: Vec<String> = farm.status()["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["builder0"]);

    // With the farm's builder certificate (mutual TLS), a builder needs no token.
    farm.start_builder_with(3, |c| {
        c.token = Credential::None;
        c.tls.identity = Some((
            c.tls.ca.as_ref().unwrap().with_file_name("builder.pem"),
            c.tls.ca.as_ref().unwrap().with_file_name("builder.key"),
        ));
    });
    farm.wait_for_builders(2);
}

/// Starts the real `kiln-scheduler` on 127.0.0.1 serving `cert` and `key`, with `secrets`'
/// tokens files; returns it and its `https://` URL, read from the line it prints.
fn scheduler_serving(
    secrets: &std::path::Path,
    cert: &str,
    key: &str,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(kiln_tests::program("kiln-scheduler"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(secrets.join(cert))
        .arg("--tls-key")
        .arg(secrets.join(key))
        .arg("--client-tokens")
        .arg(secrets.join("client-tokens"))
        .arg("--builder-tokens")
        .arg(secrets.join("builder-tokens"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start kiln-scheduler");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap_or_else(|| panic!("kiln-scheduler did not say where it listens: {line:?}"))
        .to_owned();
    (child, url)
}

#[test]
fn a_server_presenting_a_builders_certificate_is_refused_by_kiln() {
    let secrets = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(secrets.path(), &[]).unwrap();
    let s = |n: &str| secrets.path().join(n).display().to_string();
    let client = |url: &str| {
        let mut p = Project::new();
        p.env.push(("KILN_SCHEDULER".into(), url.into()));
        p.env.push(("KILN_CA_FILE".into(), s("ca.pem")));
        p.env.push(("KILN_TOKEN_FILE".into(), s("client.token")));
        p
    };

    // The scheduler with its own certificate answers kiln dist-status...
    let (mut real, url) = scheduler_serving(secrets.path(), "server.pem", "server.key");
    ok(&client(&url).kiln(&["dist-status"]));
    real.kill().unwrap();
    real.wait().unwrap();

    // ...and one that shows a builder's certificate (a builder's key posing as the scheduler,
    // to collect client tokens) is refused at the handshake, saying why and what to do.
    let (mut fake, url) = scheduler_serving(secrets.path(), "builder.pem", "builder.key");
    let out = client(&url).kiln(&["dist-status"]);
    fake.kill().unwrap();
    fake.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kiln accepted a builder's certificate"
    );
    assert!(
        stderr.contains("extended key usage for server authentication")
            && stderr.contains("server.pem"),
        "{stderr}"
    );

    // The same for kiln-cache: the remote tier is refused and the compile goes on locally.
    let store = tempfile::tempdir().unwrap();
    let cache = kiln_tests::CacheServer::start(
        store.path(),
        &[
            "--tls-cert",
            &s("builder.pem"),
            "--tls-key",
            &s("builder.key"),
            "--tokens",
            &s("client-tokens"),
        ],
    );
    let mut p = Project::with_remote(&format!("https://{}", cache.addr));
    p.env.push(("KILN_CA_FILE".into(), s("ca.pem")));
    p.env.push(("KILN_TOKEN_FILE".into(), s("client.token")));
    // Warnings name what the remote tier failed on.
    p.env.push(("KILN_LOG".into(), "warn".into()));
    p.write("a.c", "int a(void) { return 1; }\n");
    kiln_tests::settle();
    let out = ok(&p.kiln(&["gcc", "-c", "a.c", "-o", "a.o"])).clone();
    assert!(p.path("a.o").exists());
    assert_eq!(p.stat("remote_hits"), 0);
    assert!(p.stat("remote_errors") >= 1, "{}", p.stats());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("extended key usage for server authentication"),
        "{stderr}"
    );
}

/// Whether `pem`'s first certificate names `host` (DNS names are stored as plain ASCII).
fn certificate_names(pem: &std::path::Path, host: &str) -> bool {
    let certs = kiln_net::tls::read_certs("certificate", pem).unwrap();
    certs[0].windows(host.len()).any(|w| w == host.as_bytes())
}

#[test]
fn init_prints_next_steps_that_work_for_the_names_given() {
    let dir = tempfile::tempdir().unwrap();
    let farm = dir.path().join("farm");
    let init = |args: &[&str]| {
        std::process::Command::new(kiln_tests::program("kiln-scheduler"))
            .arg("init")
            .arg(&farm)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let out = ok(&init(&["--name", "schedhost"])).clone();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The addresses are the name given, and the servers listen beyond loopback for it.
    assert!(
        text.contains("--scheduler https://schedhost:7878"),
        "{text}"
    );
    assert!(
        text.contains("KILN_SCHEDULER=https://schedhost:7878"),
        "{text}"
    );
    assert!(
        text.contains("kiln-scheduler --listen 0.0.0.0:7878"),
        "{text}"
    );
    assert!(!text.contains("HOST:7878"), "{text}");
    assert!(text.contains("schedhost. For more names"), "{text}");

    // The command it gives for more names runs, keeps schedhost, and signs with the farm's CA.
    let reissue = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kiln-scheduler init"))
        .unwrap_or_else(|| panic!("no reissue command in {text}"))
        .replace("HOST", "newhost");
    let words: Vec<&str> = reissue.split_whitespace().skip(3).collect();
    assert_eq!(words[0], "--reissue-server", "{reissue}");
    let before = std::fs::read(farm.join("client.token")).unwrap();
    ok(&init(&words));
    assert!(certificate_names(&farm.join("server.pem"), "newhost"));
    assert!(certificate_names(&farm.join("server.pem"), "schedhost"));
    assert_eq!(std::fs::read(farm.join("client.token")).unwrap(), before);
    let (mut scheduler, url) = scheduler_serving(&farm, "server.pem", "server.key");
    let mut p = Project::new();
    p.env.push(("KILN_SCHEDULER".into(), url));
    p.env.push((
        "KILN_CA_FILE".into(),
        farm.join("ca.pem").display().to_string(),
    ));
    p.env.push((
        "KILN_TOKEN_FILE".into(),
        farm.join("client.token").display().to_string(),
    ));
    let status = p.kiln(&["dist-status"]);
    scheduler.kill().unwrap();
    scheduler.wait().unwrap();
    ok(&status);

    // init on the same directory refuses, and says how to reissue or start over; the commands
    // it gives work.
    let out = init(&["--name", "schedhost"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(text.contains("--reissue-server --name HOST"), "{text}");
    let start_over = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cd "))
        .unwrap_or_else(|| panic!("no command to start over in {text}"));
    let moved = std::process::Command::new("sh")
        .args(["-c", start_over])
        .status()
        .unwrap();
    assert!(moved.success(), "{start_over}");
    ok(&init(&["--name", "schedhost"]));
    assert_ne!(std::fs::read(farm.join("client.token")).unwrap(), before);
}

#[test]
fn tokens_are_rotated_and_limited_without_a_restart() {
    let farm = Farm::start(1, 1);
    let tokens = farm.secret("client-tokens");
    let dir = tempfile::tempdir().unwrap();
    let ci = dir.path().join("ci.token");
    kiln_scheduler::init::add_token(&tokens, "ci", Some(1), &ci).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ci).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // An existing token file is never replaced.
    assert!(kiln_scheduler::init::add_token(&tokens, "ci", None, &ci).is_err());

    let mut p = project(&farm);
    for (k, v) in p.env.iter_mut() {
        if k == "KILN_TOKEN_FILE" {
            *v = ci.display().to_string();
        }
    }
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "a.o", "-Iinc"]));
    assert_eq!(
        p.stats()["dist_compiles"],
        1,
        "the new token was not accepted: {}",
        p.stats()
    );

    // Revoking the first token (deleting its line) takes effect at once.
    let text = std::fs::read_to_string(&tokens).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("clients "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&tokens, kept).unwrap();
    let p2 = project(&farm);
    ok(&p2.kiln(&["gcc", "-c", "src/main.c", "-o", "b.o", "-Iinc", "-DB"]));
    assert_eq!(
        p2.stats()["dist_fallbacks_by_cause"]["refused"],
        1,
        "{}",
        p2.stats()
    );

    // jobs=1: while one job of ci's is open, a second is refused; once it ends, one is taken.
    runtime().block_on(async {
        let ci = Credential::File(ci.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(spec_for(&Digest::of(b"toolchain"), 9, vec![]))
            .await
            .unwrap();
        let mut first = farm.grpc_with(ci.clone()).await;
        let held = first
            .compile(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the first job is taken");
        let mut second = farm.grpc_with(ci.clone()).await;
        let err = second
            .compile(tokio_stream::iter(vec![spec_for(
                &Digest::of(b"t"),
                1,
                vec![],
            )]))
            .await
            .expect_err("a second job in flight was taken");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("allows 1 jobs in flight"),
            "{}",
            err.message()
        );
        drop(held);
        drop(tx);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = second
                .compile(tokio_stream::iter(vec![spec_for(
                    &Digest::of(b"t"),
                    1,
                    vec![],
                )]))
                .await;
            match r {
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the slot was never freed"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
    });
}

/// A job for the toolchain `digest` (of `size` bytes) compiling /w/x.c.
fn spec_for(digest: &Digest, size: u64, extra: Vec<InputFile>) -> FromClient {
    spec_with(digest, size, extra, "/w", vec!["/w/x.o".into()])
}

fn spec_with(
    digest: &Digest,
    size: u64,
    mut inputs: Vec<InputFile>,
    cwd: &str,
    outputs: Vec<String>,
) -> FromClient {
    let source = b"int x;\n";
    inputs.push(InputFile {
        path: "/w/x.c".into(),
        digest: Some(kiln_proto::wire_digest(
            &Digest::of(source),
            source.len() as u64,
        )),
        executable: false,
    });
    FromClient {
        msg: Some(from_client::Msg::Spec(JobSpec {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            toolchain: Some(kiln_proto::wire_digest(digest, size)),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            argv: vec!["/usr/bin/cc".into(), "-c".into(), "/w/x.c".into()],
            cwd: cwd.into(),
            inputs,
            outputs,
            label: "x.c".into(),
            ..JobSpec::default()
        })),
    }
}

/// Runs one job over the wire, answering the builder's needs from `blobs` (the source is
/// always there), and returns how it ended.
fn run_job(farm: &Farm, spec: FromClient, mut blobs: HashMap<Digest, Vec<u8>>) -> to_client::Msg {
    let source = b"int x;\n".to_vec();
    blobs.insert(Digest::of(&source), source);
    let toolchain = match &spec.msg {
        Some(from_client::Msg::Spec(s)) => s.toolchain.clone(),
        _ => None,
    };
    runtime().block_on(async {
        let mut client = farm.grpc().await;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(spec).await.unwrap();
        let mut stream = client
            .compile(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        loop {
            match stream.message().await.unwrap().and_then(|m| m.msg) {
                Some(to_client::Msg::Need(need)) => {
                    let toolchain = need.toolchain.then(|| toolchain.clone()).flatten();
                    for wire in need.files.into_iter().chain(toolchain) {
                        let digest = kiln_proto::digest_of(&wire).unwrap();
                        let data = blobs.get(&digest).cloned().unwrap_or_default();
                        let data = prost::bytes::Bytes::from(data);
                        for chunk in kiln_proto::content::chunks(&digest, &data) {
                            let _ = tx
                                .send(FromClient {
                                    msg: Some(from_client::Msg::Chunk(chunk)),
                                })
                                .await;
                        }
                    }
                }
                Some(to_client::Msg::Placed(_)) | Some(to_client::Msg::Chunk(Chunk { .. })) => {}
                Some(end) => break end,
                None => panic!("the job's stream ended without an answer"),
            }
        }
    })
}

/// A gzip'd tar built entry by entry, names written straight into the header so that the
/// hostile ones `tar` itself would refuse can be expressed.
fn archive(entries: &[(tar::EntryType, &str, &str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (kind, name, link, mode, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn refused_message(end: to_client::Msg) -> String {
    match end {
        to_client::Msg::Refused(r) => {
            assert_eq!(
                r.reason,
                kiln_proto::v1::refused::Reason::BadRequest as i32,
                "{r:?}"
            );
            r.message
        }
        other => panic!("the job was not refused: {other:?}"),
    }
}

#[test]
fn hostile_toolchain_archives_are_refused_by_the_builder_and_touch_nothing() {
    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
    let farm = Farm::start(1, 1);
    let probe = tempfile::tempdir().unwrap();
    let escape = probe.path().join("escaped");
    let escape_rel = format!("../../../../../../../..{}", escape.display());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            archive(&[(Regular, &escape_rel, "", 0o644, b"owned")]),
            "`..` is not allowed",
        ),
        (
            "absolute path",
            archive(&[(Regular, &escape.display().to_string(), "", 0o644, b"owned")]),
            "absolute paths are not allowed",
        ),
        (
            "escaping symlink",
            archive(&[
                (Symlink, "usr/lib", "../../../../..", 0o777, b""),
                (Regular, "usr/lib/x", "", 0o644, b"owned"),
            ]),
            "leaves the archive",
        ),
        (
            "symlink escaping through another",
            archive(&[
                (Directory, "a", "", 0o755, b""),
                (Symlink, "a/s", "..", 0o777, b""),
                (Symlink, "a/l", "s/../../escaped", 0o777, b""),
            ]),
            "leaves the archive",
        ),
        (
            "file below a symlink",
            archive(&[
                (Directory, "usr", "", 0o755, b""),
                (Symlink, "usr/bin", ".", 0o777, b""),
                (Regular, "usr/bin/cc", "", 0o755, b"x"),
            ]),
            "lies below a symlink",
        ),
        (
            "hard link to a host file",
            archive(&[(Link, "usr/bin/cc", "/etc/shadow", 0o755, b"")]),
            "absolute paths are not allowed",
        ),
        (
            "hard link to a file not in the archive",
            archive(&[(Link, "usr/bin/cc", "etc/shadow", 0o755, b"")]),
            "hard link to something that is not a file of this archive",
        ),
        (
            "character device",
            archive(&[(Char, "dev/mem", "", 0o666, b"")]),
            "entries are not allowed",
        ),
        (
            "block device",
            archive(&[(Block, "dev/sda", "", 0o666, b"")]),
            "entries are not allowed",
        ),
        (
            "fifo",
            archive(&[(Fifo, "tmp/f", "", 0o666, b"")]),
            "entries are not allowed",
        ),
        (
            "not an archive",
            b"\x1f\x8b\x08\x00garbage that is not gzip".to_vec(),
            "reading the archive",
        ),
    ];
    for (what, bytes, words) in cases {
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        let end = run_job(
            &farm,
            spec_for(&digest, size, vec![]),
            HashMap::from([(digest, bytes)]),
        );
        let message = refused_message(end);
        assert!(message.contains(words), "{what}: {message}");
        assert!(
            !escape.exists(),
            "{what}: a file landed outside the builder"
        );
    }
    // Nothing escaped, the builder is still there and healthy, and real jobs still run.
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 1);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"]));
    assert_eq!(p.stats()["dist_compiles"], 1);
}

#[test]
fn setuid_bits_in_a_toolchain_do_not_survive_into_the_jail() {
    let farm = Farm::start(1, 1);
    // A "compiler" that reports its own mode bits through its output.
    let script = b"#!/bin/sh\nstat -c %a /usr/bin/cc > /w/x.o\n";
    let bytes = archive(&[
        (tar::EntryType::Directory, "usr/bin", "", 0o755, b""),
        (tar::EntryType::Regular, "usr/bin/cc", "", 0o6755, script),
    ]);
    let digest = Digest::of(&bytes);
    let end = run_job(
        &farm,
        spec_for(&digest, bytes.len() as u64, vec![]),
        HashMap::from([(digest, bytes)]),
    );
    // There is no /bin/sh in that toolchain, so the job cannot succeed; what matters is the
    // image it was to run in.
    assert!(
        !matches!(&end, to_client::Msg::Finished(f) if f.exit_code == 0),
        "{end:?}"
    );
    let images = farm.builder_dir(0).join("jail/images");
    let mut seen = 0;
    for image in std::fs::read_dir(&images).unwrap() {
        let cc = image.unwrap().path().join("usr/bin/cc");
        if let Ok(meta) = std::fs::metadata(&cc) {
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            assert_eq!(mode & 0o7777, 0o755, "{}", cc.display());
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        1,
        "the image was not found under {}",
        images.display()
    );
}

#[test]
fn paths_outside_the_jail_are_refused() {
    let farm = Farm::start(1, 1);
    let p = project(&farm);
    // A real toolchain, so only the paths are at fault.
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "a.o", "-Iinc"]));
    let toolchain = farm.toolchains_on(0)[0];
    // Clients learn how many toolchains a builder holds, never their digests: a digest is
    // what a job names to run on a toolchain.
    let status = kiln_client::dist::status(&farm.client()).unwrap();
    assert_eq!(status.builders[0].toolchains_held, 1);
    assert!(status.builders[0].toolchains.is_empty(), "{status:?}");
    let header = InputFile {
        path: "/w/../../etc/cron.d/x".into(),
        digest: Some(kiln_proto::wire_digest(
            &Digest::of(HEADER.as_bytes()),
            HEADER.len() as u64,
        )),
        executable: false,
    };
    let cases: Vec<(&str, FromClient, &str)> = vec![
        (
            "input with ..",
            spec_for(&toolchain, 1, vec![header]),
            "input",
        ),
        (
            "relative working directory",
            spec_with(&toolchain, 1, vec![], "w", vec!["/w/x.o".into()]),
            "working directory",
        ),
        (
            "working directory with ..",
            spec_with(&toolchain, 1, vec![], "/w/../..", vec!["/w/x.o".into()]),
            "working directory",
        ),
        (
            "output with ..",
            spec_with(
                &toolchain,
                1,
                vec![],
                "/w",
                vec!["/w/../../etc/passwd".into()],
            ),
            "output",
        ),
        (
            "the root as output",
            spec_with(&toolchain, 1, vec![], "/w", vec!["/".into()]),
            "output",
        ),
    ];
    for (what, spec, words) in cases {
        let message = refused_message(run_job(&farm, spec, HashMap::new()));
        assert!(
            message.contains(words) && message.contains("inside the jail"),
            "{what}: {message}"
        );
    }
    // The jail helper reads the job as NUL-separated words: a NUL in the environment or an
    // argument would let the job set its own uid (here root) and limits.
    let smuggled = ["x", "--uid", "0", "--timeout-ms", "99999999"].join("\0");
    let with = |change: &dyn Fn(&mut JobSpec)| {
        let mut spec = spec_for(&toolchain, 1, vec![]);
        if let Some(from_client::Msg::Spec(s)) = &mut spec.msg {
            change(s);
        }
        spec
    };
    let env = with(&|s| {
        s.env.push(kiln_proto::v1::EnvVar {
            name: "LANG".into(),
            value: smuggled.clone(),
        })
    });
    let arg = with(&|s| s.argv.push(smuggled.clone()));
    for (what, spec) in [("variable", env), ("argument", arg)] {
        let message = refused_message(run_job(&farm, spec, HashMap::new()));
        assert!(message.contains("holds a NUL byte"), "{what}: {message}");
    }
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 1);
}

#[test]
fn malformed_and_oversized_messages_get_errors_and_the_scheduler_goes_on() {
    use prost::Message;
    let farm = Farm::start(1, 1);
    runtime().block_on(async {
        // Bytes that are not a FromClient, sent where one is expected.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Raw {
            #[prost(bytes = "vec", tag = "1")]
            data: Vec<u8>,
        }
        let channel = kiln_net::tls::endpoint(&farm.url(), &farm.client().tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = farm.client().token.interceptor().unwrap();
        let mut grpc = tonic::client::Grpc::new(
            tonic::service::interceptor::InterceptedService::new(channel, token),
        );
        grpc.ready().await.unwrap();
        let garbage = Raw {
            data: vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x99],
        };
        assert!(kiln_proto::v1::FromClient::decode(garbage.encode_to_vec().as_slice()).is_err());
        let err = grpc
            .streaming::<_, Raw, kiln_proto::v1::ToClient, _>(
                tonic::Request::new(tokio_stream::iter(vec![garbage.clone()])),
                "/kiln.v1.Scheduler/Compile".parse().unwrap(),
                tonic_prost::ProstCodec::<Raw, kiln_proto::v1::ToClient>::default(),
            )
            .await
            .expect_err("garbage was accepted");
        // The sender's fault, named as such: not INTERNAL, a fault of the scheduler's.
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("malformed FromClient"), "{err:?}");
        // The same for a unary call: a length-delimited field 1 where a number is expected.
        assert!(kiln_proto::v1::SuspectReport::decode(garbage.encode_to_vec().as_slice()).is_err());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<Raw, kiln_proto::v1::ReportReply, _>(
                tonic::Request::new(garbage.clone()),
                "/kiln.v1.Scheduler/Report".parse().unwrap(),
                tonic_prost::ProstCodec::<Raw, kiln_proto::v1::ReportReply>::default(),
            )
            .await
            .expect_err("garbage was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("malformed SuspectReport"), "{err:?}");

        // A builder registering a toolchain by a digest that is not one.
        let mut builder = farm
            .grpc_with(Credential::File(farm.secret("builder.token")))
            .await;
        let register = kiln_proto::v1::FromBuilder {
            msg: Some(kiln_proto::v1::from_builder::Msg::Register(
                kiln_proto::v1::Register {
                    protocol_version: kiln_proto::PROTOCOL_VERSION,
                    name: "odd".into(),
                    os: "linux".into(),
                    arch: "x86_64".into(),
                    slots: 1,
                    toolchains: vec![kiln_proto::v1::Digest {
                        blake3: vec![1u8; 5].into(),
                        size: 1,
                    }],
                    ..Default::default()
                },
            )),
        };
        let err = builder
            .join(tokio_stream::iter(vec![register]))
            .await
            .expect_err("a malformed digest was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("malformed digest: 5 bytes"),
            "{err:?}"
        );

        // One message over the 16 MiB limit.
        let client = farm.grpc().await;
        let huge = FromClient {
            msg: Some(from_client::Msg::Spec(JobSpec {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                label: "x".repeat(kiln_proto::MAX_MESSAGE + 1),
                ..JobSpec::default()
            })),
        };
        let err = client
            .max_encoding_message_size(64 << 20)
            .compile(tokio_stream::iter(vec![huge]))
            .await
            .expect_err("an oversized message was accepted");
        assert!(
            matches!(
                err.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{err:?}"
        );
    });
    // The scheduler still answers and its builder is still joined.
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 1);
}

#[test]
fn a_cross_check_catches_a_builder_whose_outputs_differ_and_marks_it_suspect() {
    let farm = Farm::start(1, 1);
    let mut p = project(&farm);
    p.env.push(("KILN_CROSS_CHECK".into(), "1".into()));
    // An honest builder agrees with this machine.
    let out = p.kiln(&["gcc", "-c", "src/main.c", "-o", "honest.o", "-Iinc"]);
    ok(&out);
    assert_eq!(p.stats()["cross_checks"], 1, "{}", p.stats());
    assert_eq!(p.stats()["cross_check_mismatches"], 0, "{}", p.stats());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A builder that answers with another compiler's object: clang's files, with clang at
    // /usr/bin/gcc, supplied as the toolchain for gcc.
    let gcc = String::from_utf8(p.bare(&["sh", "-c", "command -v gcc"]).stdout).unwrap();
    let clang = std::fs::canonicalize("/usr/bin/clang").unwrap();
    let mut manifest =
        kiln_client::toolchain::manifest(std::path::Path::new("/usr/bin/clang")).unwrap();
    let gcc_rel = std::path::Path::new(gcc.trim())
        .strip_prefix("/")
        .unwrap()
        .to_owned();
    let up = "../".repeat(gcc_rel.components().count() - 1);
    manifest.add(
        gcc_rel,
        kiln_archive::Source::Symlink(
            format!("{up}{}", clang.strip_prefix("/").unwrap().display()).into(),
        ),
    );
    let archive = p.path("lying.tar.gz");
    manifest
        .pack(std::fs::File::create(&archive).unwrap())
        .unwrap();
    let config = p.path("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[dist_toolchains]\n{:?} = {:?}\n",
            gcc.trim(),
            archive.to_str().unwrap()
        ),
    )
    .unwrap();
    p.env
        .push(("KILN_CONFIG".into(), config.to_str().unwrap().into()));

    let out = p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc", "-DLIE"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kiln: warning: builder builder0 compiled src/main.c differently")
            && stderr.contains("reported the builder as suspect"),
        "{stderr}"
    );
    // What was kept is this machine's object, and the statistics say what happened.
    ok(&p.bare(&["gcc", "-c", "src/main.c", "-o", "ref.o", "-Iinc", "-DLIE"]));
    assert_eq!(p.read("main.o"), p.read("ref.o"));
    assert_eq!(p.stats()["cross_checks"], 2, "{}", p.stats());
    assert_eq!(p.stats()["cross_check_mismatches"], 1, "{}", p.stats());

    // The scheduler marks it suspect, says so, and places nothing more on it.
    let status = farm.status();
    let suspect = status["builders"][0]["suspect"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        suspect.contains("main.o") && suspect.contains("reported by clients"),
        "{status}"
    );
    let text = String::from_utf8(p.kiln(&["dist-status"]).stdout).unwrap();
    assert!(text.contains("SUSPECT, no jobs placed"), "{text}");
    let metrics = farm.metrics();
    assert_eq!(metrics["kiln_scheduler_suspect_reports_total"], 1.0);
    ok(&p.kiln(&[
        "gcc",
        "-c",
        "src/main.c",
        "-o",
        "after.o",
        "-Iinc",
        "-DAFTER",
    ]));
    assert_eq!(
        p.stats()["dist_fallbacks_by_cause"]["no_builders"],
        1,
        "{}",
        p.stats()
    );
}

/// A builder that lies: it joins with a valid builder token and answers every job with the
/// object the client asked for plus a file of its own choosing, `extra`, sent as `Finished`
/// and chunks exactly as an honest builder would send outputs. `honest` is the object.
fn lying_builder(
    farm: &Farm,
    honest: Vec<u8>,
    extra: std::path::PathBuf,
) -> (
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    use kiln_proto::v1::{
        from_builder, to_builder, Finished, FromBuilder, Heartbeat, JobChunk, JobFinished,
        OutputFile, Register,
    };
    let to_farm = farm.client();
    let token = Credential::File(farm.secret("builder.token"));
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        runtime().block_on(async move {
            let channel = kiln_net::tls::endpoint(&to_farm.url, &to_farm.tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = kiln_proto::v1::scheduler_client::SchedulerClient::with_interceptor(
                channel,
                token.interceptor().unwrap(),
            );
            let (tx, rx) = tokio::sync::mpsc::channel::<FromBuilder>(64);
            let msg = |m| FromBuilder { msg: Some(m) };
            tx.send(msg(from_builder::Msg::Register(Register {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                name: "liar".into(),
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                slots: 1,
                jail: "linux".into(),
                ..Register::default()
            })))
            .await
            .unwrap();
            let mut incoming = client
                .join(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut beat = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                let next = tokio::select! {
                    _ = &mut stop_rx => return,
                    _ = beat.tick() => {
                        let hb = Heartbeat { running: 0, slots: 1 };
                        let _ = tx.send(msg(from_builder::Msg::Heartbeat(hb))).await;
                        continue;
                    }
                    next = incoming.message() => next,
                };
                let Ok(Some(m)) = next else { return };
                let Some(to_builder::Msg::Start(start)) = m.msg else {
                    continue;
                };
                let spec = start.spec.unwrap();
                let files = [
                    (spec.outputs[0].clone(), honest.clone()),
                    (
                        extra.display().to_string(),
                        b"echo the builder was here\n".to_vec(),
                    ),
                ];
                let outputs = files
                    .iter()
                    .map(|(path, data)| OutputFile {
                        path: path.clone(),
                        digest: Some(kiln_proto::wire_digest(
                            &Digest::of(data),
                            data.len() as u64,
                        )),
                    })
                    .collect();
                let finished = Finished {
                    exit_code: 0,
                    outputs,
                    builder: "liar".into(),
                    ..Finished::default()
                };
                tx.send(msg(from_builder::Msg::Finished(JobFinished {
                    job_id: start.job_id,
                    finished: Some(finished),
                })))
                .await
                .unwrap();
                for (_, data) in &files {
                    let data = prost::bytes::Bytes::from(data.clone());
                    for chunk in kiln_proto::content::chunks(&Digest::of(&data), &data) {
                        tx.send(msg(from_builder::Msg::Chunk(JobChunk {
                            job_id: start.job_id,
                            chunk: Some(chunk),
                        })))
                        .await
                        .unwrap();
                    }
                }
            }
        })
    });
    (thread, stop_tx)
}

#[test]
fn a_builder_returning_an_output_it_was_not_asked_for_writes_nothing_and_is_suspect() {
    let farm = Farm::start(0, 1);
    let p = project(&farm);
    let args = ["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"];
    ok(&p.bare(&["gcc", "-c", "src/main.c", "-o", "local.o", "-Iinc"]));
    // The client's home is the project directory: the liar aims at its shell start-up file.
    let target = p.path(".bashrc");
    let (liar, stop) = lying_builder(&farm, p.read("local.o"), target.clone());
    farm.wait_for_builders(1);

    let out = p.kiln(&args);
    ok(&out);
    assert!(
        !target.exists(),
        "the builder wrote {} on the client",
        target.display()
    );
    // The object is this machine's own, compiled locally after the result was refused.
    assert_eq!(p.read("main.o"), p.read("local.o"));
    let stats = p.stats();
    assert_eq!(stats["dist_compiles"], 0, "{stats}");
    assert_eq!(stats["dist_fallbacks_by_cause"]["suspect"], 1, "{stats}");
    // Nothing but the requested output and what the local compile wrote is in the project.
    let mut names: Vec<String> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".kiln-cache", "inc", "local.o", "main.o", "src"],
        "{names:?}"
    );

    // The scheduler marks the liar suspect and places nothing more on it.
    let status = farm.status();
    let suspect = status["builders"][0]["suspect"]
        .as_str()
        .unwrap_or_default();
    assert!(suspect.contains(".bashrc"), "{status}");
    let _ = stop.send(());
    liar.join().unwrap();
}

/// `curl` against an HTTPS endpoint that trusts `ca`; returns the status and the body.
fn curl(ca: &std::path::Path, args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        // No answer: say what curl saw.
        return (0, String::from_utf8_lossy(&out.stderr).into_owned());
    }
    (code, body.to_owned())
}

#[test]
fn kiln_cache_calls_a_malformed_message_an_invalid_argument() {
    use prost::Message;
    #[derive(Clone, PartialEq, prost::Message)]
    struct Raw {
        #[prost(bytes = "vec", tag = "1")]
        data: Vec<u8>,
    }
    let store = tempfile::tempdir().unwrap();
    let server = kiln_tests::CacheServer::start(store.path(), &[]);
    runtime().block_on(async {
        let channel = kiln_net::tls::endpoint(&server.url(), &Default::default())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        // A length-delimited field 1 where CacheGet has its protocol version, a number.
        let garbage = Raw {
            data: b"not a number".to_vec(),
        };
        assert!(kiln_proto::v1::CacheGet::decode(garbage.encode_to_vec().as_slice()).is_err());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<Raw, kiln_proto::v1::CacheEntry, _>(
                tonic::Request::new(garbage),
                "/kiln.v1.Cache/Get".parse().unwrap(),
                tonic_prost::ProstCodec::<Raw, kiln_proto::v1::CacheEntry>::default(),
            )
            .await
            .expect_err("garbage was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("malformed CacheGet"), "{err:?}");
    });
}

#[test]
fn kiln_cache_over_tls_takes_writes_only_with_a_token() {
    kiln_tests::require("curl");
    let secrets = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(secrets.path(), &[]).unwrap();
    let s = |n: &str| secrets.path().join(n).display().to_string();
    let store = tempfile::tempdir().unwrap();
    let server = kiln_tests::CacheServer::start(
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
    let url = format!("https://{}", server.addr);
    let ca = secrets.path().join("ca.pem");
    let token = std::fs::read_to_string(secrets.path().join("client.token")).unwrap();
    let key = "ab".repeat(32);
    let at = format!("{url}/cas/{key}");

    // Plain text gets no HTTP answer; HTTPS does.
    let (status, _) = std::panic::catch_unwind(|| server.request("GET", "/metrics", b""))
        .unwrap_or((0, Vec::new()));
    assert_eq!(status, 0, "plain text was answered");
    assert_eq!(curl(&ca, &[&format!("{url}/ac/{key}")]).0, 404);
    // Writes need the token: missing, wrong, then right (as a bearer and as a URL password).
    let (status, body) = curl(
        &ca,
        &[
            "-X",
            "PUT",
            "--data-binary",
            "x",
            &format!("{url}/ac/{key}"),
        ],
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("writing needs a client token"), "{body}");
    let wrong = curl(
        &ca,
        &[
            "-X",
            "PUT",
            "-H",
            "Authorization: Bearer nope",
            "--data-binary",
            "x",
            &at,
        ],
    );
    assert_eq!(wrong.0, 401, "{}", wrong.1);
    assert!(
        wrong.1.contains("not in kiln-cache's --tokens"),
        "{}",
        wrong.1
    );
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let ok_put = curl(
        &ca,
        &[
            "-X",
            "PUT",
            "-H",
            &bearer,
            "--data-binary",
            "x",
            &format!("{url}/ac/{key}"),
        ],
    );
    assert_eq!(ok_put.0, 200, "{}", ok_put.1);
    let basic = curl(
        &ca,
        &[
            "-X",
            "PUT",
            "-u",
            &format!("ccache:{}", token.trim()),
            "--data-binary",
            "y",
            &format!("{url}/ccache/{key}"),
        ],
    );
    assert_eq!(basic.0, 200, "{}", basic.1);
    assert_eq!(curl(&ca, &[&format!("{url}/ac/{key}")]), (200, "x".into()));

    // kiln's remote tier over gRPC with TLS: one machine stores, another hits.
    let machine = |with_token: bool| {
        let mut p = Project::with_remote(&url);
        p.env
            .push(("KILN_CA_FILE".into(), ca.display().to_string()));
        if with_token {
            p.env.push(("KILN_TOKEN_FILE".into(), s("client.token")));
        }
        p.write("inc/v.h", "#define V 7\n");
        p.write("src/m.c", "#include \"v.h\"\nint m(void) { return V; }\n");
        kiln_tests::settle();
        p
    };
    let args = ["gcc", "-c", "src/m.c", "-o", "m.o", "-Iinc"];
    let anonymous = machine(false);
    ok(&anonymous.kiln(&args));
    let st = anonymous.stats();
    assert_eq!(
        (st["remote_uploads"].as_i64(), st["remote_errors"].as_i64()),
        (Some(0), Some(1)),
        "{st}"
    );
    let a = machine(true);
    ok(&a.kiln(&args));
    assert_eq!(a.stats()["remote_uploads"], 2, "{}", a.stats());
    let b = machine(false);
    b.kiln_matches_bare(&args, "m.o");
    assert_eq!(
        b.stats()["remote_hits"],
        1,
        "reads are open without --private: {}",
        b.stats()
    );
}

#[test]
fn a_gzip_bomb_toolchain_stops_at_the_builders_cap_and_leaves_nothing() {
    use std::io::Read;
    let mut farm = Farm::start(0, 1);
    farm.start_builder_with(0, |c| c.limits.toolchain_unpacked = 32 << 20);
    farm.wait_for_builders(1);
    // 1 GiB of zeros in one file: about a megabyte of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut b = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_path("usr/bin/cc").unwrap();
        h.set_size(1 << 30);
        h.set_mode(0o755);
        h.set_cksum();
        b.append(&h, std::io::repeat(0).take(1 << 30)).unwrap();
        b.finish().unwrap();
    }
    let bytes = gz.finish().unwrap();
    assert!(bytes.len() < 8 << 20, "{} bytes", bytes.len());
    let digest = Digest::of(&bytes);
    let started = std::time::Instant::now();
    let end = run_job(
        &farm,
        spec_for(&digest, bytes.len() as u64, vec![]),
        HashMap::from([(digest, bytes)]),
    );
    let message = refused_message(end);
    assert!(
        message.contains("archive expands past the limit of 33554432 bytes"),
        "{message}"
    );
    // It stopped at the cap, not at the end of the gigabyte.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Nothing of it is left in the builder's images.
    let images = farm.builder_dir(0).join("jail/images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The jail tests' probe, built static: a "compiler" that reports what it sees.
fn probe() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("probe");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../jails/tests/probe.c");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc builds the probe");
    assert!(built.success());
    std::fs::read(out).unwrap()
}

/// A job running the probe with `args`, in `cwd`, asking for `dirs`.
fn probe_job(digest: &Digest, size: u64, cwd: &str, dirs: &[&str], args: &[&str]) -> FromClient {
    let mut spec = spec_with(digest, size, vec![], cwd, vec![format!("{cwd}/x.o")]);
    if let Some(from_client::Msg::Spec(s)) = &mut spec.msg {
        s.argv = std::iter::once("/usr/bin/cc")
            .chain(args.iter().copied())
            .map(String::from)
            .collect();
        s.dirs = dirs.iter().map(|d| d.to_string()).collect();
    }
    spec
}

#[test]
fn a_job_sees_nothing_of_an_earlier_clients_directories() {
    let farm = Farm::start(1, 1);
    let probe = probe();
    let bytes = archive(&[
        (tar::EntryType::Directory, "usr/bin", "", 0o755, b""),
        (tar::EntryType::Regular, "usr/bin/cc", "", 0o755, &probe),
        (tar::EntryType::Directory, "etc", "", 0o755, b""),
        (
            tar::EntryType::Regular,
            "etc/motd",
            "",
            0o644,
            b"from the image\n",
        ),
    ]);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let blobs = HashMap::from([(digest, bytes)]);
    // Alice's job: its directories are named after her project and branch, and one of them
    // stands where the toolchain has a file.
    let alice = probe_job(
        &digest,
        size,
        "/home/alice/merger-secret",
        &["/home/alice/merger-secret/branch-layoffs", "/etc/motd"],
        &["hello"],
    );
    let end = run_job(&farm, alice, blobs.clone());
    assert!(matches!(end, to_client::Msg::Finished(_)), "{end:?}");
    // Bob's job runs in the same container once it is back in the pool.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while farm
        .builder_metrics(0)
        .get("kiln_builder_containers_ready")
        .copied()
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no container came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let bob = probe_job(&digest, size, "/w", &[], &["ls", "/", "/home", "/etc"]);
    let seen = match run_job(&farm, bob, blobs.clone()) {
        to_client::Msg::Finished(f) => String::from_utf8_lossy(&f.stdout).into_owned(),
        other => panic!("bob's job did not run: {other:?}"),
    };
    assert!(!seen.contains("alice"), "bob sees alice's paths: {seen}");
    assert!(seen.contains("/etc/motd"), "{seen}");
    let bob = probe_job(&digest, size, "/w", &[], &["cat", "/etc/motd"]);
    match run_job(&farm, bob, blobs) {
        to_client::Msg::Finished(f) => assert_eq!(
            String::from_utf8_lossy(&f.stdout),
            "from the image\n",
            "an earlier job's directory hides the image's file"
        ),
        other => panic!("bob's job did not run: {other:?}"),
    }
}

#[test]
fn a_job_that_fills_its_disk_is_its_own_failure_not_the_builders() {
    let mut farm = Farm::start(0, 1);
    farm.start_builder_with(0, |c| c.limits.disk = 16 << 20);
    farm.wait_for_builders(1);
    let probe = probe();
    let bytes = archive(&[
        (tar::EntryType::Directory, "usr/bin", "", 0o755, b""),
        (tar::EntryType::Regular, "usr/bin/cc", "", 0o755, &probe),
    ]);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let blobs = HashMap::from([(digest, bytes)]);
    let job = probe_job(&digest, size, "/w", &[], &["fill", "/w/x.o"]);
    match run_job(&farm, job, blobs.clone()) {
        to_client::Msg::Finished(f) => {
            assert_eq!(
                f.killed,
                format!("disk limit ({} bytes)", 16 << 20),
                "{f:?}"
            );
            assert_eq!(f.exit_code, 1);
        }
        other => panic!("the job was not its own failure: {other:?}"),
    }
    let retried = farm.metrics()["kiln_scheduler_job_retries_total"];
    assert_eq!(retried, 0.0, "a job's own failure was retried elsewhere");
    // And the builder goes on.
    let job = probe_job(&digest, size, "/w", &[], &["write", "/w/x.o"]);
    match run_job(&farm, job, blobs) {
        to_client::Msg::Finished(f) => assert_eq!(f.exit_code, 0, "{f:?}"),
        other => panic!("{other:?}"),
    }
}

/// A `kiln-builder` process run by an ordinary user (`nobody`), killed when dropped.
struct RootlessBuilder {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RootlessBuilder {
    fn start(farm: &Farm) -> RootlessBuilder {
        use std::os::unix::fs::{chown, PermissionsExt};
        const NOBODY: u32 = 65_534;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        for name in ["ca.pem", "builder.token"] {
            let copy = dir.path().join(name);
            std::fs::copy(farm.secret(name), &copy).unwrap();
            chown(&copy, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let child = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(kiln_tests::program("kiln-builder"))
            .args([
                "--scheduler",
                &farm.url(),
                "--slots",
                "1",
                "--name",
                "rootless",
            ])
            .arg("--ca")
            .arg(dir.path().join("ca.pem"))
            .arg("--token-file")
            .arg(dir.path().join("builder.token"))
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .arg("--jail-helper")
            .arg(kiln_tests::jail_helper())
            .env_clear()
            .env("KILN_LOG", "info")
            .spawn()
            .expect("setpriv (util-linux) starts the builder as nobody");
        RootlessBuilder { child, _dir: dir }
    }
}

impl Drop for RootlessBuilder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_builder_run_by_an_ordinary_user_keeps_jobs_jailed_and_objects_identical() {
    let farm = Farm::start(0, 1);
    let _builder = RootlessBuilder::start(&farm);
    farm.wait_for_builders(1);
    assert_eq!(
        farm.status()["builders"][0]["jail"],
        "linux-rootless",
        "{}",
        farm.status()
    );
    // A real compile, byte-identical to the local one.
    let p = project(&farm);
    kiln_tests::sample::remote_matches_local(
        &p,
        &[
            "gcc",
            "-g",
            "-O2",
            "-c",
            "src/main.c",
            "-o",
            "main.o",
            "-Iinc",
        ],
        "main.o",
    );
    assert_eq!(
        kiln_tests::sample::stat(&p, "dist_compiles"),
        1,
        "{}",
        p.stats()
    );

    // A hostile job: the same refusals as on a root builder.
    let probe = probe();
    let bytes = archive(&[
        (tar::EntryType::Directory, "usr/bin", "", 0o755, b""),
        (tar::EntryType::Regular, "usr/bin/cc", "", 0o755, &probe),
    ]);
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    let blobs = HashMap::from([(digest, bytes)]);
    let job = probe_job(&digest, size, "/w", &[], &["escape"]);
    let report = match run_job(&farm, job, blobs.clone()) {
        to_client::Msg::Finished(f) => String::from_utf8_lossy(&f.stdout).into_owned(),
        other => panic!("the probe did not run: {other:?}"),
    };
    for call in ["unshare-user", "mount", "keyctl", "ptrace", "bpf"] {
        assert!(
            report.contains(&format!("{call} Operation not permitted")),
            "{call}: {report}"
        );
    }
    assert!(report.contains("fork ok"), "{report}");
    let job = probe_job(&digest, size, "/w", &[], &["hello"]);
    match run_job(&farm, job, blobs) {
        to_client::Msg::Finished(f) => {
            let out = String::from_utf8_lossy(&f.stdout).into_owned();
            assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
            assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        }
        other => panic!("{other:?}"),
    }
}
