//! kiln's own protocol to a `kiln-cache` (`kiln.v1.Cache`): one call per entry, the kind and
//! key named in the request.

use kiln_cache::Digest;
use kiln_proto::v1::cache_client::CacheClient;
use kiln_proto::v1::{CacheGet, CachePut};

use super::{Entry, MAX_BODY};

type Channel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    kiln_net::auth::Bearer,
>;

/// A `kiln.v1.Cache` client presenting kiln's token.
#[derive(Debug, Clone)]
pub(super) struct Client(CacheClient<Channel>);

impl Client {
    pub(super) fn new(channel: tonic::transport::Channel, token: kiln_net::auth::Bearer) -> Client {
        Client(
            CacheClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_BODY)
                .max_encoding_message_size(MAX_BODY),
        )
    }

    pub(super) async fn get(
        &self,
        kind: Entry,
        key: &Digest,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let request = CacheGet {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            kind: kind.path().into(),
            key: key.to_hex(),
        };
        let entry = self.0.clone().get(request).await?.into_inner();
        Ok(entry.found.then(|| entry.body.to_vec()))
    }

    pub(super) async fn put(
        &self,
        kind: Entry,
        key: &Digest,
        body: &[u8],
    ) -> Result<(), tonic::Status> {
        let request = CachePut {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            kind: kind.path().into(),
            key: key.to_hex(),
            body: bytes::Bytes::copy_from_slice(body),
        };
        self.0.clone().put(request).await?;
        Ok(())
    }
}
