//! A KV endpoint that stores nothing: every Range, Put, DeleteRange, Txn and Compact
//! is answered at once with an empty response (a Range finds no key). It is a
//! calibration point, not a server: writes run against it show what the client and
//! the gRPC transport (tonic, as in kvstore) cost on this machine. With a file to
//! sync, each put is also appended to it and acknowledged after an fdatasync that
//! covers it (group commit): the least any durable server does for a put here.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

use anyhow::{Context, Result};
use etcd_api::etcdserverpb::kv_server::{Kv, KvServer};
use etcd_api::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

struct NullKv {
    /// With `--fsync-file`: the group-commit thread that makes each put durable.
    log: Option<mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>>,
}

/// Appends each put's key and value to `file` and fdatasyncs once per group of puts
/// that arrived while the previous group synced, then acknowledges the group: the
/// least a durable server does for a put.
fn group_commit(mut file: File, puts: mpsc::Receiver<(Vec<u8>, oneshot::Sender<()>)>) {
    while let Ok(first) = puts.recv() {
        let mut group = vec![first];
        group.extend(puts.try_iter());
        let records: Vec<u8> = group
            .iter()
            .flat_map(|(record, _)| record.iter().copied())
            .collect();
        if let Err(error) = file.write_all(&records) {
            eprintln!("kvbench: cannot write the null server's file: {error}");
            std::process::exit(1);
        }
        if let Err(error) = file.sync_data() {
            eprintln!("kvbench: cannot sync the null server's file: {error}");
            std::process::exit(1);
        }
        for (_, done) in group {
            let _ = done.send(());
        }
    }
}

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

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        if let Some(log) = &self.log {
            let request = request.into_inner();
            let mut record = request.key;
            record.extend_from_slice(&request.value);
            let (done, synced) = oneshot::channel();
            log.send((record, done))
                .map_err(|_| Status::unavailable("the null server's log has stopped"))?;
            synced
                .await
                .map_err(|_| Status::unavailable("the null server's log has stopped"))?;
        }
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

/// Serves the null KV service on `listen` until the process is stopped. With
/// `fsync_file`, puts are appended to that file (created, or truncated) and each is
/// acknowledged after an fdatasync that covers it.
pub async fn serve(listen: SocketAddr, fsync_file: Option<&Path>) -> Result<()> {
    let log = match fsync_file {
        Some(path) => {
            let file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let (log, puts) = mpsc::channel();
            std::thread::Builder::new()
                .name("group-commit".into())
                .spawn(move || group_commit(file, puts))
                .context("cannot start the group-commit thread")?;
            Some(log)
        }
        None => None,
    };
    let incoming = tonic::transport::server::TcpIncoming::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?
        .with_nodelay(Some(true));
    eprintln!(
        "kvbench: null KV server on {}",
        incoming.local_addr().context("listener address")?
    );
    tonic::transport::Server::builder()
        .add_service(KvServer::new(NullKv { log }))
        .serve_with_incoming(incoming)
        .await
        .context("null KV server")
}
