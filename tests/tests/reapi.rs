//! kiln-cache as a Remote Execution API cache, spoken to by a REAPI client built from the
//! published protocol (the `bazel-remote-apis` crate): capabilities, the CAS, the action cache
//! and ByteStream, with the errors REAPI clients expect for wrong digests, missing blobs,
//! truncated and resumed writes, instance names and tokens.

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use kiln_tests::CacheServer;
use sha2::Digest as _;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        size_bytes: data.len() as i64,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn channel(server: &CacheServer) -> Channel {
    Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

type Cas = re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;

/// `FindMissingBlobs` of `digests` in `instance`: the missing ones, or the call's error.
async fn missing(
    cas: &mut Cas,
    digests: Vec<re::Digest>,
    instance: &str,
) -> Result<Vec<re::Digest>, tonic::Status> {
    let request = re::FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: digests,
        ..Default::default()
    };
    Ok(cas
        .find_missing_blobs(request)
        .await?
        .into_inner()
        .missing_blob_digests)
}

fn upload(data: &[u8]) -> re::batch_update_blobs_request::Request {
    re::batch_update_blobs_request::Request {
        digest: Some(digest(data)),
        data: data.to_vec(),
        ..Default::default()
    }
}

#[test]
fn the_cas_and_the_action_cache_keep_what_they_are_given_and_check_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = CacheServer::start(dir.path(), &[]);
    runtime().block_on(async {
        let ch = channel(&server).await;
        let caps = re::capabilities_client::CapabilitiesClient::new(ch.clone())
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let cache = caps.cache_capabilities.unwrap();
        assert_eq!(
            cache.digest_functions,
            [re::digest_function::Value::Sha256 as i32]
        );
        assert!(
            cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        );
        assert!(caps.execution_capabilities.is_none());

        let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            ch.clone(),
        );
        let hello = b"hello, remote cache\n";
        let absent = missing(&mut cas, vec![digest(hello)], "").await.unwrap();
        assert_eq!(absent, [digest(hello)]);

        // One good blob and one whose bytes do not match its digest.
        let mut lying = upload(b"what it says");
        lying.data = b"something else".to_vec();
        let done = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![upload(hello), lying],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .responses;
        assert_eq!(done[0].status.as_ref().unwrap().code, 0);
        assert_eq!(
            done[1].status.as_ref().unwrap().code,
            tonic::Code::InvalidArgument as i32,
            "{:?}",
            done[1]
        );
        let absent = missing(&mut cas, vec![digest(hello), digest(b"what it says")], "")
            .await
            .unwrap();
        assert_eq!(absent, [digest(b"what it says")], "a lying blob was kept");

        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![digest(hello), digest(b"never sent")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .responses;
        assert_eq!(read[0].data, hello);
        assert_eq!(
            read[1].status.as_ref().unwrap().code,
            tonic::Code::NotFound as i32
        );
        // The empty instance shares Bazel's HTTP cache.
        let (code, body) = server.request("GET", &format!("/cas/{}", digest(hello).hash), b"");
        assert_eq!((code, body.as_slice()), (200, &hello[..]));
        // Another instance is another cache.
        let absent = missing(&mut cas, vec![digest(hello)], "team-b")
            .await
            .unwrap();
        assert_eq!(absent, [digest(hello)]);

        // An action result naming a blob the CAS lacks is refused, naming the blob.
        let mut ac = re::action_cache_client::ActionCacheClient::new(ch.clone());
        let action = digest(b"an action");
        let result = |out: &[u8]| re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out/a.o".into(),
                digest: Some(digest(out)),
                ..Default::default()
            }],
            exit_code: 0,
            ..Default::default()
        };
        let update = |r: re::ActionResult, instance: &str| re::UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            action_result: Some(r),
            ..Default::default()
        };
        let refused = ac
            .update_action_result(update(result(b"not uploaded"), ""))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        let violations = refused
            .get_details_precondition_failure()
            .expect("a PreconditionFailure")
            .violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].r#type, "MISSING");
        assert!(
            violations[0]
                .subject
                .contains(&digest(b"not uploaded").hash),
            "{violations:?}"
        );

        ac.update_action_result(update(result(hello), ""))
            .await
            .unwrap();
        let get = |instance: &str| re::GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        };
        let got = ac.get_action_result(get("")).await.unwrap().into_inner();
        assert_eq!(got, result(hello));
        let other = ac.get_action_result(get("team-b")).await.unwrap_err();
        assert_eq!(other.code(), tonic::Code::NotFound);

        // A result whose output was evicted is a miss: take the blob's entry out of the store.
        let evicted = b"an output the store will lose";
        cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: "team-b".into(),
            requests: vec![upload(evicted)],
            ..Default::default()
        })
        .await
        .unwrap();
        ac.update_action_result(update(result(evicted), "team-b"))
            .await
            .unwrap();
        assert!(ac.get_action_result(get("team-b")).await.is_ok());
        let removed = remove_entries_holding(dir.path(), evicted);
        assert_eq!(removed, 1);
        let gone = ac.get_action_result(get("team-b")).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");

        // Wrong digests are the client's error.
        let bad = missing(
            &mut cas,
            vec![re::Digest {
                hash: "XYZ".into(),
                size_bytes: 1,
            }],
            "",
        )
        .await
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let bad = missing(&mut cas, vec![digest(hello)], "a/../b")
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    });
}

/// Removes the store's entries whose bytes hold `payload`: an eviction, as far as a reader can
/// tell.
fn remove_entries_holding(dir: &std::path::Path, payload: &[u8]) -> usize {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap_or_default()
                .windows(payload.len())
                .any(|w| w == payload)
            {
                std::fs::remove_file(&p).unwrap();
                removed += 1;
            }
        }
    }
    removed
}

fn write_request(name: &str, offset: usize, data: &[u8], finish: bool) -> bs::WriteRequest {
    bs::WriteRequest {
        resource_name: name.into(),
        write_offset: offset as i64,
        finish_write: finish,
        data: data.to_vec(),
    }
}

#[test]
fn bytestream_writes_resume_after_a_break_and_reads_take_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let server = CacheServer::start(dir.path(), &[]);
    runtime().block_on(async {
        let ch = channel(&server).await;
        let mut stream = bs::byte_stream_client::ByteStreamClient::new(ch.clone());
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest(&blob);
        let name = format!("ci/uploads/3f1c/blobs/{}/{}", d.hash, d.size_bytes);

        // The first attempt breaks off after 100,000 bytes.
        let first = vec![
            write_request(&name, 0, &blob[..60_000], false),
            write_request("", 60_000, &blob[60_000..100_000], false),
        ];
        let broken = stream.write(tokio_stream::iter(first)).await;
        assert!(broken.is_err(), "an unfinished write succeeded");
        let status = stream
            .query_write_status(bs::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((status.committed_size, status.complete), (100_000, false));

        // The resume sends the rest from there.
        let rest = vec![write_request(&name, 100_000, &blob[100_000..], true)];
        let done = stream
            .write(tokio_stream::iter(rest))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.committed_size, blob.len() as i64);
        let status = stream
            .query_write_status(bs::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(status.complete);

        // Read it back whole, then a piece from an offset, in the same instance only.
        let read = |name: String, offset: i64, limit: i64| bs::ReadRequest {
            resource_name: name,
            read_offset: offset,
            read_limit: limit,
        };
        let whole = format!("ci/blobs/{}/{}", d.hash, d.size_bytes);
        let mut got = Vec::new();
        let mut piece = Vec::new();
        for (offset, limit, into) in [(0, 0, &mut got), (250_000, 1000, &mut piece)] {
            let mut parts = stream
                .read(read(whole.clone(), offset, limit))
                .await
                .unwrap()
                .into_inner();
            while let Some(part) = parts.message().await.unwrap() {
                into.extend(part.data);
            }
        }
        assert_eq!(got, blob);
        assert_eq!(piece, &blob[250_000..251_000]);
        let elsewhere = stream
            .read(read(format!("blobs/{}/{}", d.hash, d.size_bytes), 0, 0))
            .await;
        assert_eq!(elsewhere.unwrap_err().code(), tonic::Code::NotFound);

        // Bytes that do not match the digest, and more bytes than it names, are refused.
        let lie = format!("ci/uploads/9/blobs/{}/5", digest(b"12345").hash);
        let refused = stream
            .write(tokio_stream::iter(vec![write_request(
                &lie, 0, b"54321", true,
            )]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let refused = stream
            .write(tokio_stream::iter(vec![write_request(
                &lie, 0, b"123456", true,
            )]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let mut cas =
            re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
        let absent = missing(&mut cas, vec![digest(b"12345")], "ci")
            .await
            .unwrap();
        assert_eq!(absent.len(), 1, "a refused write was kept");
    });
}

#[test]
fn reapi_calls_need_the_token_kiln_cache_asks_for() {
    let secrets = tempfile::tempdir().unwrap();
    kiln_scheduler::init::farm(secrets.path(), &[]).unwrap();
    let tokens = secrets.path().join("client-tokens").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let server = CacheServer::start(
        dir.path(),
        &["--tokens", &tokens, "--private", "--insecure"],
    );
    let token = std::fs::read_to_string(secrets.path().join("client.token")).unwrap();
    runtime().block_on(async {
        let ch = channel(&server).await;
        // What the server offers is no secret (and Bazel 2.x asks it without its headers).
        let mut caps = re::capabilities_client::CapabilitiesClient::new(ch.clone());
        assert!(caps
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await
            .is_ok());
        // What it stores is, with --private.
        let mut ac = re::action_cache_client::ActionCacheClient::new(ch.clone());
        let lookup = || re::GetActionResultRequest {
            action_digest: Some(digest(b"an action")),
            ..Default::default()
        };
        let refused = ac.get_action_result(lookup()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("token"), "{refused:?}");
        let mut request = tonic::Request::new(lookup());
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().unwrap(),
        );
        let answer = ac.get_action_result(request).await.unwrap_err();
        assert_eq!(answer.code(), tonic::Code::NotFound, "{answer:?}");
    });
}
