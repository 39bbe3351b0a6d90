//! A KV endpoint that stores nothing: every Range, Put, DeleteRange, Txn and Compact
//! is answered at once with an empty response (a Range finds no key). It is a
//! calibration point, not a server: writes run against it show what the client and
//! the gRPC transport (tonic, as in kvstore) cost on this machine.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use kvstore::pb::etcdserverpb::kv_server::{Kv, KvServer};
use kvstore::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

struct NullKv;

fn header() -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision: 1,
        raft_term: 1,
    })
}

#[tonic::async_trait]
impl Kv for NullKv {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Ok(Response::new(RangeResponse {
            header: header(),
            ..Default::default()
        }))
    }

    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Ok(Response::new(PutResponse {
            header: header(),
            ..Default::default()
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Ok(Response::new(DeleteRangeResponse {
            header: header(),
            ..Default::default()
        }))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Ok(Response::new(TxnResponse {
            header: header(),
            succeeded: true,
            ..Default::default()
        }))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Ok(Response::new(CompactionResponse { header: header() }))
    }
}

/// Serves the null KV service on `listen` until the process is stopped.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?
        .with_nodelay(Some(true));
    eprintln!(
        "kvbench: null KV server on {}",
        incoming.local_addr().context("listener address")?
    );
    tonic::transport::Server::builder()
        .add_service(KvServer::new(NullKv))
        .serve_with_incoming(incoming)
        .await
        .context("null KV server")
}
