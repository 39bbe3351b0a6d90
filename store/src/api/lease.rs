//! The Lease service: Grant, Revoke, KeepAlive, TimeToLive, Leases.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::EtcdError;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::server::{Error, EtcdServer};

/// The Lease service of one member.
pub struct LeaseService {
    server: Arc<EtcdServer>,
}

impl LeaseService {
    /// A Lease service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> LeaseService {
        LeaseService { server }
    }
}

impl LeaseService {
    /// Renews leases as requests arrive on `inbound`; responses go to the returned
    /// receiver (the gRPC service and the JSON gateway both use it).
    pub fn keep_alive_session(
        &self,
        mut inbound: impl futures::Stream<Item = Result<LeaseKeepAliveRequest, Status>>
            + Unpin
            + Send
            + 'static,
    ) -> mpsc::Receiver<Result<LeaseKeepAliveResponse, Status>> {
        use futures::StreamExt;
        let (responses, outbound) = mpsc::channel(16);
        let server = self.server.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = inbound.next().await {
                // The header is taken before renewing, as etcd does: a lease revoked
                // at some revision is never reported alive at a later one.
                let header = server.header(0);
                let response = match server.lease_renew(request.id).await {
                    Ok(ttl) => Ok(LeaseKeepAliveResponse {
                        header,
                        id: request.id,
                        ttl,
                    }),
                    // An expired or unknown lease is answered with TTL 0.
                    Err(Error::Etcd(EtcdError::LeaseNotFound)) => Ok(LeaseKeepAliveResponse {
                        header,
                        id: request.id,
                        ttl: 0,
                    }),
                    Err(error) => Err(Status::from(error)),
                };
                let failed = response.is_err();
                if responses.send(response).await.is_err() || failed {
                    return;
                }
            }
        });
        outbound
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.server.lease_grant(request.id, request.ttl).await?,
        ))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        Ok(Response::new(
            self.server.lease_revoke(request.into_inner().id).await?,
        ))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let outbound = self.keep_alive_session(request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        match self
            .server
            .lease_time_to_live(request.id, request.keys)
            .await
        {
            Ok(response) => {
                // The attached keys are listed only to a user who may read each of
                // them (etcd before 3.4.26 leaked them to anyone).
                for key in &response.keys {
                    self.server.check_read(key, &[])?;
                }
                Ok(Response::new(response))
            }
            // etcd answers an unknown lease with TTL -1 rather than an error.
            Err(Error::Etcd(EtcdError::LeaseNotFound)) => {
                Ok(Response::new(LeaseTimeToLiveResponse {
                    header: self.server.header(0),
                    id: request.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.server.leases()))
    }
}
