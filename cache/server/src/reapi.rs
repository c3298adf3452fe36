//! The Remote Execution API's cache (REAPI v2): `Capabilities`, `ActionCache`,
//! `ContentAddressableStorage` and `google.bytestream.ByteStream`, on the same port and store
//! as the HTTP protocols, for Bazel, Buck2, BuildStream, recc and the other REAPI clients.
//! Execution is not offered.
//!
//! The messages come from the published `.proto` files, compiled by the `bazel-remote-apis`
//! crate. Entries of the empty instance name are Bazel's HTTP `/ac/` and `/cas/` entries, so
//! either protocol reads what the other wrote; every other instance name has a namespace of its
//! own. Every blob is verified against its SHA-256 before it is stored, and an action result is
//! served only while every blob it names is in the store (an evicted output is a miss, not a
//! result the client cannot fetch), with the output files the client asks for inlined up to
//! one batch's size. Bodies are held in memory up to `--max-body`, as the HTTP
//! protocols' are; ByteStream reads are sent in chunks, and a write may be resumed after its
//! connection broke (`QueryWriteStatus` says how much arrived; unfinished uploads are kept up to
//! 256 MiB in all).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use kiln_cache::{Digest, Hasher};
use sha2::Digest as _;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{fetch, store, AppState, Got, Route};

/// The metrics label of every REAPI call.
pub(crate) const PROTOCOL: usize = 5;
/// The most a batch call may carry, and the size of a ByteStream read's chunks.
const MAX_BATCH: usize = 4 << 20;
const READ_CHUNK: usize = 64 << 10;
/// Unfinished uploads kept for resuming, at most, and the bytes they may hold together: a
/// client that begins uploads and walks away cannot make the server hold more.
const MAX_PARTIAL: usize = 64;
const MAX_PARTIAL_BYTES: usize = 256 << 20;

/// The four services over one state.
#[derive(Clone)]
pub(crate) struct Reapi {
    st: AppState,
    /// Uploads begun and not finished, by resource name: what arrived so far.
    partial: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl Reapi {
    pub(crate) fn new(st: AppState) -> Reapi {
        Reapi {
            st,
            partial: Arc::default(),
        }
    }

    fn authorize<T>(&self, request: &Request<T>, write: bool) -> Result<(), Status> {
        let header = request
            .metadata()
            .get(kiln_net::auth::HEADER)
            .and_then(|v| v.to_str().ok());
        self.st
            .access(header, write)
            .map_err(Status::unauthenticated)
    }

    /// Whether the CAS holds `d` (by the entry's presence; a damaged one is found on read).
    fn has(&self, instance: &str, d: &Blob) -> bool {
        let key = key(Space::Cas, instance, &d.hash);
        d.size == 0 || self.st.store.path_of(kiln_cache::Kind::Blob, &key).exists()
    }

    async fn read_blob(&self, instance: &str, d: &Blob) -> Result<Option<Vec<u8>>, Status> {
        if d.size == 0 {
            return Ok(Some(Vec::new()));
        }
        match fetch(
            &self.st,
            key(Space::Cas, instance, &d.hash),
            PROTOCOL,
            false,
        )
        .await
        {
            // The store verified its own checksum; the name is checked too, in case the entry
            // was written for another size.
            Got::Hit(body) if body.len() as u64 == d.size => Ok(Some(body)),
            Got::Hit(_) | Got::Miss => Ok(None),
            Got::Failed(e) => Err(Status::internal(e)),
        }
    }

    async fn write_blob(&self, instance: &str, d: &Blob, data: Vec<u8>) -> Result<(), Status> {
        check_content(d, &data)?;
        if d.size == 0 {
            return Ok(());
        }
        store(
            &self.st,
            key(Space::Cas, instance, &d.hash),
            PROTOCOL,
            data.into(),
        )
        .await
        .map_err(Status::resource_exhausted)
    }
}

/// A checked digest: 64 lowercase hex digits and a size that is not negative.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blob {
    hash: String,
    size: u64,
}

fn blob(d: Option<&re::Digest>) -> Result<Blob, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("a digest is missing"))?;
    if !crate::is_sha256_hex(&d.hash) {
        return Err(Status::invalid_argument(format!(
            "{:?} is not a SHA-256 hash (64 lowercase hex digits); kiln-cache offers SHA-256 only",
            d.hash
        )));
    }
    let size = u64::try_from(d.size_bytes)
        .map_err(|_| Status::invalid_argument(format!("{}: a negative size", d.hash)))?;
    Ok(Blob {
        hash: d.hash.clone(),
        size,
    })
}

fn wire(b: &Blob) -> re::Digest {
    re::Digest {
        hash: b.hash.clone(),
        size_bytes: b.size as i64,
    }
}

fn check_content(d: &Blob, data: &[u8]) -> Result<(), Status> {
    if data.len() as u64 != d.size {
        return Err(Status::invalid_argument(format!(
            "{}: {} bytes arrived for a blob of {}",
            d.hash,
            data.len(),
            d.size
        )));
    }
    let actual: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != d.hash {
        return Err(Status::invalid_argument(format!(
            "the data's SHA-256 is {actual}, not {}",
            d.hash
        )));
    }
    Ok(())
}

/// Which store a key belongs to.
#[derive(Debug, Clone, Copy)]
enum Space {
    Ac,
    Cas,
}

/// The store key of a hash in an instance: the empty instance shares Bazel's HTTP entries.
fn key(space: Space, instance: &str, hash: &str) -> Digest {
    match (space, instance) {
        (Space::Ac, "") => Route::BazelAc(hash.to_owned()).key(),
        (Space::Cas, "") => Route::BazelCas(hash.to_owned()).key(),
        (Space::Ac, i) => Hasher::new("kiln-cache reapi v1")
            .str("ac")
            .str(i)
            .str(hash)
            .finish(),
        (Space::Cas, i) => Hasher::new("kiln-cache reapi v1")
            .str("cas")
            .str(i)
            .str(hash)
            .finish(),
    }
}

/// An instance name as REAPI allows it: path segments, none of them a reserved word.
fn instance(name: &str) -> Result<&str, Status> {
    let reserved = [
        "blobs",
        "uploads",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
        "compressed-blobs",
    ];
    let bad = name
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == ".." || reserved.contains(&s));
    if name.is_empty() || (!bad && name.len() <= 256) {
        Ok(name)
    } else {
        Err(Status::invalid_argument(format!(
            "{name:?} is not an instance name kiln-cache accepts"
        )))
    }
}

fn rpc_ok() -> Option<RpcStatus> {
    Some(RpcStatus::default())
}

fn rpc_error(s: &Status) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: s.code() as i32,
        message: s.message().to_owned(),
        details: Vec::new(),
    })
}

/// Every blob an action result names, with where it is named.
fn referenced(r: &re::ActionResult) -> Vec<(String, Option<&re::Digest>)> {
    let mut out: Vec<(String, Option<&re::Digest>)> = Vec::new();
    for f in &r.output_files {
        out.push((format!("output file {}", f.path), f.digest.as_ref()));
    }
    for d in &r.output_directories {
        out.push((
            format!("output directory {}", d.path),
            d.tree_digest.as_ref(),
        ));
    }
    if let Some(d) = &r.stdout_digest {
        out.push(("stdout".into(), Some(d)));
    }
    if let Some(d) = &r.stderr_digest {
        out.push(("stderr".into(), Some(d)));
    }
    out
}

#[tonic::async_trait]
impl re::capabilities_server::Capabilities for Reapi {
    async fn get_capabilities(
        &self,
        _request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        // Answered without a token, even --private: it says what the server offers, nothing
        // that is stored, and Bazel 2.x asks it without the headers it sends on reads.
        let version = |minor| SemVer {
            major: 2,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        Ok(Response::new(re::ServerCapabilities {
            cache_capabilities: Some(re::CacheCapabilities {
                digest_functions: vec![re::digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: MAX_BATCH as i64,
                symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                ..re::CacheCapabilities::default()
            }),
            execution_capabilities: None,
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
            ..re::ServerCapabilities::default()
        }))
    }
}

#[tonic::async_trait]
impl re::action_cache_server::ActionCache for Reapi {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?;
        let action = blob(r.action_digest.as_ref())?;
        let found = match fetch(
            &self.st,
            key(Space::Ac, inst, &action.hash),
            PROTOCOL,
            false,
        )
        .await
        {
            Got::Hit(body) => body,
            Got::Miss => return Err(Status::not_found(format!("no result for {}", action.hash))),
            Got::Failed(e) => return Err(Status::internal(e)),
        };
        let mut result = <re::ActionResult as prost::Message>::decode(found.as_slice())
            .map_err(|_| Status::not_found(format!("no readable result for {}", action.hash)))?;
        // A result whose outputs were evicted cannot be used: a miss, so the client runs the
        // action again.
        for (what, d) in referenced(&result) {
            let b = blob(d)?;
            if !self.has(inst, &b) {
                return Err(Status::not_found(format!(
                    "the result of {} names {what}, whose blob {} is gone",
                    action.hash, b.hash
                )));
            }
        }
        // The output files the client asked for inline, while they fit one batch: the client
        // saves a read per file (kiln's remote tier reads every entry this way).
        let mut budget = MAX_BATCH;
        for f in &mut result.output_files {
            if !r.inline_output_files.contains(&f.path) {
                continue;
            }
            let b = blob(f.digest.as_ref())?;
            if b.size > budget as u64 {
                continue;
            }
            match self.read_blob(inst, &b).await? {
                Some(data) => {
                    budget -= data.len();
                    f.contents = data;
                }
                None => {
                    return Err(Status::not_found(format!(
                        "the result of {} names output file {}, whose blob {} is gone",
                        action.hash, f.path, b.hash
                    )))
                }
            }
        }
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.authorize(&request, true)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?;
        let action = blob(r.action_digest.as_ref())?;
        let result = r
            .action_result
            .ok_or_else(|| Status::invalid_argument("no action_result"))?;
        let mut missing = ErrorDetails::new();
        let mut any = false;
        for (what, d) in referenced(&result) {
            let b = blob(d)?;
            if !self.has(inst, &b) {
                any = true;
                missing.add_precondition_failure_violation(
                    "MISSING",
                    format!("blobs/{}/{}", b.hash, b.size),
                    format!("{what} is not in the CAS: upload it first"),
                );
            }
        }
        if any {
            return Err(Status::with_error_details(
                tonic::Code::FailedPrecondition,
                "the action result names blobs the CAS does not hold",
                missing,
            ));
        }
        let body = prost::Message::encode_to_vec(&result);
        store(
            &self.st,
            key(Space::Ac, inst, &action.hash),
            PROTOCOL,
            body.into(),
        )
        .await
        .map_err(Status::resource_exhausted)?;
        Ok(Response::new(result))
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl re::content_addressable_storage_server::ContentAddressableStorage for Reapi {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?.to_owned();
        let blobs = r
            .blob_digests
            .iter()
            .map(|d| blob(Some(d)))
            .collect::<Result<Vec<_>, _>>()?;
        let this = self.clone();
        let missing = tokio::task::spawn_blocking(move || {
            blobs
                .into_iter()
                .filter(|b| !this.has(&inst, b))
                .map(|b| wire(&b))
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(re::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        self.authorize(&request, true)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?;
        let total: usize = r.requests.iter().map(|q| q.data.len()).sum();
        if total > MAX_BATCH {
            return Err(Status::resource_exhausted(format!(
                "a batch carries at most {MAX_BATCH} bytes; send larger blobs with ByteStream"
            )));
        }
        let mut responses = Vec::with_capacity(r.requests.len());
        for q in r.requests {
            let digest = q.digest.clone();
            let status = if q.compressor != re::compressor::Value::Identity as i32 {
                rpc_error(&Status::invalid_argument(
                    "kiln-cache takes uncompressed blobs",
                ))
            } else {
                match blob(q.digest.as_ref()) {
                    Ok(b) => match self.write_blob(inst, &b, q.data).await {
                        Ok(()) => rpc_ok(),
                        Err(e) => rpc_error(&e),
                    },
                    Err(e) => rpc_error(&e),
                }
            };
            responses.push(re::batch_update_blobs_response::Response { digest, status });
        }
        Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?;
        let blobs = r
            .digests
            .iter()
            .map(|d| blob(Some(d)))
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        if total > MAX_BATCH as u64 {
            return Err(Status::invalid_argument(format!(
                "a batch carries at most {MAX_BATCH} bytes; read larger blobs with ByteStream"
            )));
        }
        let mut responses = Vec::with_capacity(blobs.len());
        for b in blobs {
            let (data, status) = match self.read_blob(inst, &b).await {
                Ok(Some(data)) => (data, rpc_ok()),
                Ok(None) => (
                    Vec::new(),
                    rpc_error(&Status::not_found(format!("{} is not in the CAS", b.hash))),
                ),
                Err(e) => (Vec::new(), rpc_error(&e)),
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(wire(&b)),
                data,
                status,
                ..Default::default()
            });
        }
        Ok(Response::new(re::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Boxed<re::GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let inst = instance(&r.instance_name)?.to_owned();
        let root = blob(r.root_digest.as_ref())?;
        let page = usize::try_from(r.page_size)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(1000);
        let skip: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("a page token this server did not give"))?
        };
        // Breadth first from the root; every directory read is verified against its digest.
        let mut order = vec![root];
        let mut dirs = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut i = 0;
        while i < order.len() {
            let b = order[i].clone();
            i += 1;
            if !seen.insert(b.hash.clone()) {
                continue;
            }
            let Some(data) = self.read_blob(&inst, &b).await? else {
                return Err(Status::not_found(format!(
                    "directory {} is not in the CAS",
                    b.hash
                )));
            };
            let dir = <re::Directory as prost::Message>::decode(data.as_slice()).map_err(|_| {
                Status::invalid_argument(format!("{} is not a Directory message", b.hash))
            })?;
            for child in &dir.directories {
                order.push(blob(child.digest.as_ref())?);
            }
            dirs.push(dir);
        }
        let pages: Vec<Result<re::GetTreeResponse, Status>> = dirs
            .into_iter()
            .skip(skip)
            .collect::<Vec<_>>()
            .chunks(page)
            .enumerate()
            .map(|(n, chunk)| {
                let next = skip + (n + 1) * page;
                Ok(re::GetTreeResponse {
                    directories: chunk.to_vec(),
                    next_page_token: if next < seen.len() {
                        next.to_string()
                    } else {
                        String::new()
                    },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(pages))))
    }

    async fn split_blob(
        &self,
        _: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("kiln-cache does not split blobs"))
    }

    type GetChunkMappingStream = Boxed<re::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("kiln-cache does not split blobs"))
    }

    async fn splice_blob(
        &self,
        _: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("kiln-cache does not splice blobs"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("kiln-cache does not splice blobs"))
    }
}

/// A ByteStream resource name: `{instance}/blobs/{hash}/{size}` to read,
/// `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/anything]` to write.
fn resource(name: &str, write: bool) -> Result<(String, Blob), Status> {
    let segs: Vec<&str> = name.split('/').collect();
    let bad = || {
        Status::invalid_argument(format!(
            "{name:?} is not a resource name ({{instance}}/{} {{hash}}/{{size}})",
            if write {
                "uploads/{uuid}/blobs/"
            } else {
                "blobs/"
            }
        ))
    };
    let at = segs
        .iter()
        .position(|s| *s == if write { "uploads" } else { "blobs" })
        .ok_or_else(bad)?;
    if segs[..at].contains(&"compressed-blobs") || segs.get(at + 2) == Some(&"compressed-blobs") {
        return Err(Status::invalid_argument(
            "kiln-cache offers no compressed blobs",
        ));
    }
    let rest = if write {
        if segs.get(at + 2) != Some(&"blobs") || segs.get(at + 1).is_none_or(|u| u.is_empty()) {
            return Err(bad());
        }
        &segs[at + 3..]
    } else {
        &segs[at + 1..]
    };
    let (hash, size) = match rest {
        [h, s] => (*h, *s),
        [h, s, ..] if write => (*h, *s),
        _ => return Err(bad()),
    };
    let size: i64 = size.parse().map_err(|_| bad())?;
    let b = blob(Some(&re::Digest {
        hash: hash.to_owned(),
        size_bytes: size,
    }))?;
    let inst = instance(&segs[..at].join("/"))?.to_owned();
    Ok((inst, b))
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Reapi {
    type ReadStream = Boxed<bs::ReadResponse>;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let (inst, b) = resource(&r.resource_name, false)?;
        let offset = u64::try_from(r.read_offset)
            .ok()
            .filter(|o| *o <= b.size)
            .ok_or_else(|| {
                Status::out_of_range(format!("offset {} is past the blob", r.read_offset))
            })?;
        let limit = u64::try_from(r.read_limit)
            .map_err(|_| Status::invalid_argument("a negative read limit"))?;
        let data = self
            .read_blob(&inst, &b)
            .await?
            .ok_or_else(|| Status::not_found(format!("{} is not in the CAS", b.hash)))?;
        let end = if limit == 0 {
            b.size
        } else {
            (offset + limit).min(b.size)
        };
        let data = prost::bytes::Bytes::from(data).slice(offset as usize..end as usize);
        let chunks: Vec<Result<bs::ReadResponse, Status>> = (0..data.len())
            .step_by(READ_CHUNK)
            .map(|at| {
                Ok(bs::ReadResponse {
                    data: data.slice(at..(at + READ_CHUNK).min(data.len())).to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        self.authorize(&request, true)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty write"))?;
        let name = first.resource_name.clone();
        let (inst, b) = resource(&name, true)?;
        if b.size > self.st.max_body as u64 {
            return Err(Status::resource_exhausted(format!(
                "blobs are limited to {} bytes (kiln-cache --max-body)",
                self.st.max_body
            )));
        }
        // A resumed upload continues what arrived before; a new one starts empty.
        let mut data = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name)
            .unwrap_or_default();
        let mut message = Some(first);
        loop {
            let Some(m) = message.take() else {
                match stream.message().await {
                    Ok(Some(m)) => {
                        message = Some(m);
                        continue;
                    }
                    // The client went away before finishing: keep what arrived for a resume.
                    Ok(None) | Err(_) => {
                        self.keep_partial(name, data);
                        return Err(Status::invalid_argument(
                            "the write ended before finish_write; resume it from QueryWriteStatus",
                        ));
                    }
                }
            };
            if !m.resource_name.is_empty() && m.resource_name != name {
                return Err(Status::invalid_argument("one write names one resource"));
            }
            if u64::try_from(m.write_offset).ok() != Some(data.len() as u64) {
                let at = data.len();
                self.keep_partial(name, data);
                return Err(Status::invalid_argument(format!(
                    "write_offset {} where {at} bytes have arrived",
                    m.write_offset
                )));
            }
            if data.len() as u64 + m.data.len() as u64 > b.size {
                return Err(Status::invalid_argument(format!(
                    "more than the {} bytes of {}",
                    b.size, b.hash
                )));
            }
            data.extend_from_slice(&m.data);
            if m.finish_write {
                let committed = data.len() as i64;
                self.write_blob(&inst, &b, data).await?;
                return Ok(Response::new(bs::WriteResponse {
                    committed_size: committed,
                }));
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        self.authorize(&request, true)?;
        let name = request.into_inner().resource_name;
        let (inst, b) = resource(&name, true)?;
        if self.has(&inst, &b) {
            return Ok(Response::new(bs::QueryWriteStatusResponse {
                committed_size: b.size as i64,
                complete: true,
            }));
        }
        let committed = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .map_or(0, |d| d.len() as i64);
        Ok(Response::new(bs::QueryWriteStatusResponse {
            committed_size: committed,
            complete: false,
        }))
    }
}

impl Reapi {
    /// Keeps an unfinished upload for a resume, dropping the others when too many wait.
    fn keep_partial(&self, name: String, data: Vec<u8>) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = partial.values().map(Vec::len).sum();
        if partial.len() >= MAX_PARTIAL || held + data.len() > MAX_PARTIAL_BYTES {
            // Whoever resumes one of these starts it again (QueryWriteStatus says 0).
            partial.clear();
        }
        if data.len() <= MAX_PARTIAL_BYTES {
            partial.insert(name, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names() {
        let h = "a".repeat(64);
        let (i, b) = resource(&format!("blobs/{h}/5"), false).unwrap();
        assert_eq!((i.as_str(), b.size), ("", 5));
        let (i, _) = resource(&format!("team/x/blobs/{h}/5"), false).unwrap();
        assert_eq!(i, "team/x");
        let (i, b) = resource(&format!("main/uploads/u-1/blobs/{h}/7/meta"), true).unwrap();
        assert_eq!((i.as_str(), b.size), ("main", 7));
        for bad in [
            format!("blobs/{h}"),
            format!("blobs/{h}/-1"),
            "blobs/xyz/1".to_string(),
            format!("uploads/blobs/{h}/1"),
            format!("compressed-blobs/zstd/{h}/1"),
            format!("a/../blobs/{h}/1"),
        ] {
            let write = bad.contains("uploads");
            assert!(resource(&bad, write).is_err(), "{bad}");
        }
        assert_ne!(key(Space::Cas, "", &h), key(Space::Cas, "a", &h));
        assert_ne!(key(Space::Ac, "a", &h), key(Space::Cas, "a", &h));
    }
}
