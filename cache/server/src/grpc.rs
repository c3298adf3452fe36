//! The `kiln.v1.Cache` gRPC service: kiln clients' remote tier, on the HTTP protocols' port and
//! store. Entries are the same as `/kiln/<kind>/<key>`'s, so either transport reads what the
//! other wrote.

use kiln_proto::v1::cache_server::Cache;
use kiln_proto::v1::{
    CacheEntry, CacheGet, CachePut, CachePutReply, CacheStats, CacheStatsRequest,
};
use kiln_proto::{version_mismatch, PROTOCOL_VERSION};
use tonic::{Request, Response, Status};

use crate::{fetch, store, AppState, Got, Route, KILN_KINDS};

#[derive(Clone)]
pub(crate) struct CacheService(pub(crate) AppState);

/// The route a kiln kind and key name, or why they are not one.
fn kiln_route(version: u32, kind: &str, key: &str) -> Result<Route, Status> {
    if version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(version_mismatch(
            "the client",
            version,
        )));
    }
    let kind = KILN_KINDS
        .iter()
        .find(|k| **k == kind)
        .ok_or_else(|| Status::invalid_argument(format!("unknown entry kind {kind:?}")))?;
    if !crate::is_sha256_hex(key) {
        return Err(Status::invalid_argument("a key is 64 lowercase hex digits"));
    }
    Ok(Route::Kiln(kind, key.to_owned()))
}

impl CacheService {
    fn authorize<T>(&self, request: &Request<T>, write: bool) -> Result<(), Status> {
        let header = request
            .metadata()
            .get(kiln_net::auth::HEADER)
            .and_then(|v| v.to_str().ok());
        self.0
            .access(header, write)
            .map_err(Status::unauthenticated)
    }
}

#[tonic::async_trait]
impl Cache for CacheService {
    async fn get(&self, request: Request<CacheGet>) -> Result<Response<CacheEntry>, Status> {
        self.authorize(&request, false)?;
        let r = request.into_inner();
        let route = kiln_route(r.protocol_version, &r.kind, &r.key)?;
        match fetch(&self.0, route.key(), route.protocol(), false).await {
            Got::Hit(body) => Ok(Response::new(CacheEntry {
                found: true,
                body: body.into(),
            })),
            Got::Miss => Ok(Response::new(CacheEntry::default())),
            Got::Failed(e) => Err(Status::internal(e)),
        }
    }

    async fn put(&self, request: Request<CachePut>) -> Result<Response<CachePutReply>, Status> {
        self.authorize(&request, true)?;
        let r = request.into_inner();
        let route = kiln_route(r.protocol_version, &r.kind, &r.key)?;
        if r.body.len() > self.0.max_body {
            return Err(Status::resource_exhausted(format!(
                "bodies are limited to {} bytes",
                self.0.max_body
            )));
        }
        store(&self.0, route.key(), route.protocol(), r.body)
            .await
            .map_err(Status::resource_exhausted)?;
        Ok(Response::new(CachePutReply {}))
    }

    async fn stats(
        &self,
        request: Request<CacheStatsRequest>,
    ) -> Result<Response<CacheStats>, Status> {
        self.authorize(&request, false)?;
        let (hits, misses) = self.0.counts.lookups();
        Ok(Response::new(CacheStats { hits, misses }))
    }
}
