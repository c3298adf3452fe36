//! kiln's entries in any cache of the Remote Execution API (REAPI v2), so a team's existing
//! REAPI cache serves kiln too.
//!
//! The layout, for an entry of kind `K` (`result`, `manifest`, `go-action`, `go-output`) and
//! key `KEY` (kiln's hex digest) in the instance `KILN_REMOTE_INSTANCE`:
//!
//! - a `Command` with the arguments `kiln-entry layout-1 K KEY` and the one output path
//!   `entry`, and an `Action` naming that command and the empty input root: both are real
//!   messages, stored in the CAS, so the entry names itself to anyone who looks;
//! - the action cache maps the `Action`'s digest to an `ActionResult` with exit code 0 and one
//!   output file, `entry`, whose digest is the entry's bytes, stored in the CAS.
//!
//! A lookup asks for the result with `entry` inlined; a server that does not inline is read
//! through ByteStream. The body is checked against its SHA-256 whatever the server says, and a
//! result whose blob is gone (evicted, or never uploaded) is a miss. A store uploads the three
//! blobs in one `BatchUpdateBlobs` when they fit the server's advertised batch limit, a larger
//! body through a ByteStream write in chunks, and then updates the action cache. The server's
//! capabilities are asked once per process, at the first store: a server that takes no
//! action-cache updates is read-only, and one without SHA-256 is an error.

use std::cell::OnceCell;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use kiln_cache::Digest;
use prost::Message as _;
use sha2::Digest as _;
use tonic::Code;

use super::{Entry, MAX_BODY};

/// The one output path of every kiln action.
const OUTPUT: &str = "entry";
/// Names this layout in every `Command`, so a later one does not read entries it cannot.
const LAYOUT: &str = "layout-1";
/// What a batch may carry when the server sets no lower limit: gRPC's usual message limit.
const DEFAULT_BATCH: usize = 4 << 20;
/// Room left in a batch for the messages around the blobs.
const BATCH_MARGIN: usize = 64 << 10;
/// The size of a ByteStream write's messages.
const WRITE_CHUNK: usize = 1 << 20;

type Channel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    kiln_net::auth::Bearer,
>;

/// What the server's `GetCapabilities` allows.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// The bytes one `BatchUpdateBlobs` may carry.
    batch: usize,
    /// Whether the action cache takes updates from clients.
    update: bool,
}

/// A REAPI client of one instance, presenting kiln's token as a bearer header.
#[derive(Debug)]
pub(super) struct Client {
    channel: Channel,
    instance: String,
    limits: OnceCell<Limits>,
}

/// The SHA-256 digest of `data`, as REAPI names blobs.
fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha256_hex(data),
        size_bytes: data.len() as i64,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The action that names one kiln entry: its digest, and the blobs of it and its command.
fn action(kind: Entry, key: &Digest) -> (re::Digest, [(re::Digest, Vec<u8>); 2]) {
    let command = re::Command {
        arguments: vec![
            "kiln-entry".into(),
            LAYOUT.into(),
            kind.path().into(),
            key.to_hex(),
        ],
        output_paths: vec![OUTPUT.into()],
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = digest(&command);
    let action = re::Action {
        command_digest: Some(command_digest.clone()),
        // The empty `Directory` encodes to no bytes.
        input_root_digest: Some(digest(b"")),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = digest(&action);
    (
        action_digest.clone(),
        [(command_digest, command), (action_digest, action)],
    )
}

impl Client {
    pub(super) fn new(
        channel: tonic::transport::Channel,
        token: kiln_net::auth::Bearer,
        instance: String,
    ) -> Client {
        Client {
            channel: tonic::service::interceptor::InterceptedService::new(channel, token),
            instance,
            limits: OnceCell::new(),
        }
    }

    fn ac(&self) -> re::action_cache_client::ActionCacheClient<Channel> {
        re::action_cache_client::ActionCacheClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_BODY)
    }

    fn cas(
        &self,
    ) -> re::content_addressable_storage_client::ContentAddressableStorageClient<Channel> {
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(MAX_BODY)
        .max_encoding_message_size(MAX_BODY)
    }

    fn bytestream(&self) -> bs::byte_stream_client::ByteStreamClient<Channel> {
        bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_BODY)
    }

    /// A ByteStream resource name in this instance.
    fn resource(&self, rest: &str) -> String {
        if self.instance.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.instance)
        }
    }

    /// The server's limits, asked once.
    async fn limits(&self) -> Result<Limits, tonic::Status> {
        if let Some(l) = self.limits.get() {
            return Ok(*l);
        }
        let caps = re::capabilities_client::CapabilitiesClient::new(self.channel.clone())
            .get_capabilities(re::GetCapabilitiesRequest {
                instance_name: self.instance.clone(),
            })
            .await?
            .into_inner();
        let cache = caps.cache_capabilities.unwrap_or_default();
        let sha256 = re::digest_function::Value::Sha256 as i32;
        // Servers older than REAPI 2.0's list name no function and mean SHA-256.
        if !cache.digest_functions.is_empty() && !cache.digest_functions.contains(&sha256) {
            return Err(tonic::Status::failed_precondition(
                "the server's cache does not offer SHA-256 digests, which kiln's entries use",
            ));
        }
        let batch = usize::try_from(cache.max_batch_total_size_bytes)
            .ok()
            .filter(|n| *n > 0)
            .map_or(DEFAULT_BATCH, |n| n.min(DEFAULT_BATCH));
        let update = cache
            .action_cache_update_capabilities
            .is_some_and(|u| u.update_enabled);
        if !update {
            tracing::debug!("the REAPI cache takes no action-cache updates: kiln only reads it");
        }
        let limits = Limits { batch, update };
        let _ = self.limits.set(limits);
        Ok(limits)
    }

    pub(super) async fn get(
        &self,
        kind: Entry,
        key: &Digest,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let (action_digest, _) = action(kind, key);
        let request = re::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action_digest),
            inline_output_files: vec![OUTPUT.into()],
            ..Default::default()
        };
        let result = match self.ac().get_action_result(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s),
        };
        let Some(file) = result.output_files.into_iter().find(|f| f.path == OUTPUT) else {
            tracing::debug!("the REAPI cache's result for {key} has no {OUTPUT:?}: a miss");
            return Ok(None);
        };
        let Some((d, size)) = file
            .digest
            .and_then(|d| Some((usize::try_from(d.size_bytes).ok()?, d)))
            .filter(|(size, _)| *size <= MAX_BODY)
            .map(|(size, d)| (d, size))
        else {
            return Ok(None);
        };
        // Inlined, or read from the CAS when the server did not inline it.
        let body = if file.contents.len() == size && (size == 0 || !file.contents.is_empty()) {
            file.contents
        } else {
            match self.read(&d, size).await? {
                Some(body) => body,
                None => return Ok(None),
            }
        };
        if sha256_hex(&body) != d.hash {
            tracing::debug!(
                "the REAPI cache's blob {} does not match its digest: a miss",
                d.hash
            );
            return Ok(None);
        }
        Ok(Some(body))
    }

    /// A CAS blob through ByteStream, or `None` when the server does not hold it.
    async fn read(&self, d: &re::Digest, size: usize) -> Result<Option<Vec<u8>>, tonic::Status> {
        let request = bs::ReadRequest {
            resource_name: self.resource(&format!("blobs/{}/{}", d.hash, d.size_bytes)),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = match self.bytestream().read(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s),
        };
        let mut body = Vec::with_capacity(size);
        loop {
            match stream.message().await {
                Ok(Some(m)) if body.len() + m.data.len() <= size => body.extend_from_slice(&m.data),
                // More than the digest's size: not this blob.
                Ok(Some(_)) => return Ok(None),
                Ok(None) => return Ok(Some(body)),
                Err(s) if s.code() == Code::NotFound => return Ok(None),
                Err(s) => return Err(s),
            }
        }
    }

    /// Stores an entry; `false` when the server takes no action-cache updates.
    pub(super) async fn put(
        &self,
        kind: Entry,
        key: &Digest,
        body: &[u8],
    ) -> Result<bool, tonic::Status> {
        let limits = self.limits().await?;
        if !limits.update {
            return Ok(false);
        }
        let (action_digest, named) = action(kind, key);
        let body_digest = digest(body);
        let mut batch: Vec<(re::Digest, Vec<u8>)> = named.into();
        let small: usize = batch.iter().map(|(_, b)| b.len()).sum();
        if body.is_empty() {
            // The empty blob is in every CAS without an upload.
        } else if small + body.len() + BATCH_MARGIN <= limits.batch {
            batch.push((body_digest.clone(), body.to_vec()));
        } else {
            self.write(&body_digest, body).await?;
        }
        self.batch_update(batch).await?;
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: OUTPUT.into(),
                digest: Some(body_digest),
                ..Default::default()
            }],
            exit_code: 0,
            execution_metadata: Some(re::ExecutedActionMetadata {
                worker: "kiln".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.ac()
            .update_action_result(re::UpdateActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(action_digest),
                action_result: Some(result),
                ..Default::default()
            })
            .await?;
        Ok(true)
    }

    async fn batch_update(&self, blobs: Vec<(re::Digest, Vec<u8>)>) -> Result<(), tonic::Status> {
        let requests = blobs
            .into_iter()
            .map(|(d, data)| re::batch_update_blobs_request::Request {
                digest: Some(d),
                data,
                ..Default::default()
            })
            .collect();
        let answers = self
            .cas()
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests,
                ..Default::default()
            })
            .await?
            .into_inner()
            .responses;
        for a in answers {
            let status = a.status.unwrap_or_default();
            if status.code != Code::Ok as i32 {
                let hash = a.digest.map(|d| d.hash).unwrap_or_default();
                return Err(tonic::Status::new(
                    Code::from(status.code),
                    format!("storing blob {hash}: {}", status.message),
                ));
            }
        }
        Ok(())
    }

    /// Uploads a blob too large for a batch through ByteStream, unless the CAS has it.
    async fn write(&self, d: &re::Digest, body: &[u8]) -> Result<(), tonic::Status> {
        let missing = self
            .cas()
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: vec![d.clone()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .missing_blob_digests;
        if missing.is_empty() {
            return Ok(());
        }
        let name = self.resource(&format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        ));
        let body = bytes::Bytes::copy_from_slice(body);
        let size = body.len();
        let chunks: Vec<bs::WriteRequest> = (0..size)
            .step_by(WRITE_CHUNK)
            .map(|at| {
                let end = (at + WRITE_CHUNK).min(size);
                bs::WriteRequest {
                    // The name goes in the first message only, as the protocol asks.
                    resource_name: if at == 0 { name.clone() } else { String::new() },
                    write_offset: at as i64,
                    finish_write: end == size,
                    data: body.slice(at..end).to_vec(),
                }
            })
            .collect();
        let committed = self
            .bytestream()
            .write(tokio_stream::iter(chunks))
            .await?
            .into_inner()
            .committed_size;
        // A server that already held the blob may end the write early, saying so.
        if committed != size as i64 {
            return Err(tonic::Status::data_loss(format!(
                "the server committed {committed} of the {size} bytes of blob {}",
                d.hash
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_is_its_own_action_and_names_itself() {
        let k1 = kiln_cache::Hasher::new("t").str("1").finish();
        let k2 = kiln_cache::Hasher::new("t").str("2").finish();
        let (a, blobs) = action(Entry::Result, &k1);
        assert_ne!(a, action(Entry::Manifest, &k1).0);
        assert_ne!(a, action(Entry::Result, &k2).0);
        assert_eq!(
            a,
            action(Entry::Result, &k1).0,
            "the same entry, the same action"
        );
        let command = re::Command::decode(blobs[0].1.as_slice()).unwrap();
        assert_eq!(
            command.arguments,
            ["kiln-entry", LAYOUT, "result", &k1.to_hex()]
        );
        let parsed = re::Action::decode(blobs[1].1.as_slice()).unwrap();
        assert_eq!(parsed.command_digest, Some(blobs[0].0.clone()));
        assert_eq!(digest(&blobs[1].1), a);
    }
}
