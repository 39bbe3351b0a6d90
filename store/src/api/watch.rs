//! The Watch service: one task per gRPC stream reads create, cancel and progress
//! requests and forwards the watch stream's deliveries, adding previous values and
//! fragmenting as each watcher asked.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::mvcc;
use crate::mvcc::watch::{Delivery, WatchSpec, WatchStream, STREAM_PROGRESS_ID};
use crate::pb::etcdserverpb::watch_create_request::FilterType;
use crate::pb::etcdserverpb::watch_request::RequestUnion;
use crate::pb::etcdserverpb::watch_server::Watch;
use crate::pb::etcdserverpb::{RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::Event;
use crate::server::EtcdServer;

/// Responses queued towards one client before the stream stops reading deliveries.
const RESPONSE_QUEUE: usize = 4;

/// The Watch service of one member.
pub struct WatchService {
    server: Arc<EtcdServer>,
}

impl WatchService {
    /// A Watch service over `server`.
    pub fn new(server: Arc<EtcdServer>) -> WatchService {
        WatchService { server }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

impl WatchService {
    /// Runs a watch session over any request stream; responses go to the returned
    /// receiver (the gRPC service and the JSON gateway both use it).
    pub fn session(
        &self,
        inbound: impl futures::Stream<Item = Result<WatchRequest, Status>> + Unpin + Send + 'static,
    ) -> mpsc::Receiver<Result<WatchResponse, Status>> {
        let (responses, outbound) = mpsc::channel(RESPONSE_QUEUE);
        let session = Session {
            // The session outlives the request's task: it keeps the user it was
            // opened for.
            caller: crate::server::caller(),
            stream: self.server.mvcc().watch_stream(),
            server: self.server.clone(),
            options: HashMap::new(),
            responses,
        };
        tokio::spawn(session.run(inbound));
        outbound
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let outbound = self.session(request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}

/// What a watcher asked for beyond what the watch stream handles.
#[derive(Default)]
struct Options {
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// Events were sent since the last progress tick: the next notification is elided.
    sent_since_tick: bool,
}

struct Session {
    caller: Result<Option<crate::pb::kvstorepb::AuthInfo>, crate::error::EtcdError>,
    stream: WatchStream,
    server: Arc<EtcdServer>,
    options: HashMap<i64, Options>,
    responses: mpsc::Sender<Result<WatchResponse, Status>>,
}

/// Why a session ended.
enum End {
    /// The client closed its side or went away.
    Client,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: impl futures::Stream<Item = Result<WatchRequest, Status>> + Unpin,
    ) {
        use futures::StreamExt;
        let interval = self.server.limits().watch_progress_notify_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let result = tokio::select! {
                request = inbound.next() => match request {
                    Some(Ok(request)) => self.handle(request).await,
                    // As etcd: the stream ends when the client closes its side.
                    None | Some(Err(_)) => Err(End::Client),
                },
                delivery = self.stream.next() => match delivery {
                    Some(delivery) => self.deliver(delivery).await,
                    None => Err(End::Client),
                },
                _ = ticker.tick() => {
                    self.progress_tick();
                    Ok(())
                }
            };
            if let Err(End::Client) = result {
                return;
            }
        }
    }

    async fn send(&self, response: WatchResponse) -> Result<(), End> {
        self.responses
            .send(Ok(response))
            .await
            .map_err(|_| End::Client)
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), End> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.stream.cancel(cancel.watch_id) {
                    self.options.remove(&cancel.watch_id);
                    let header = self.server.header(self.server.mvcc().hub_revision());
                    self.send(WatchResponse {
                        header,
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.stream.request_progress(STREAM_PROGRESS_ID);
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> Result<(), End> {
        // The whole watched range must be readable: a from-key watch (range end
        // "\0") reaches every later key.
        let permitted =
            self.server
                .check_read_as(self.caller.clone(), &create.key, &create.range_end);
        if let Err(error) = permitted {
            let response = WatchResponse {
                header: self.server.header(self.server.mvcc().hub_revision()),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: crate::server::go_rpc_error(error),
                ..Default::default()
            };
            return self.send(response).await;
        }
        let spec = WatchSpec {
            watch_id: create.watch_id,
            key: create.key,
            range_end: create.range_end,
            start_revision: create.start_revision,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
        };
        let response = match self.stream.watch(&spec) {
            Ok((watch_id, revision)) => {
                self.options.insert(
                    watch_id,
                    Options {
                        prev_kv: create.prev_kv,
                        fragment: create.fragment,
                        progress_notify: create.progress_notify,
                        sent_since_tick: false,
                    },
                );
                WatchResponse {
                    header: self.server.header(revision),
                    watch_id,
                    created: true,
                    ..Default::default()
                }
            }
            Err(error) => WatchResponse {
                header: self.server.header(self.server.mvcc().hub_revision()),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: error.to_string(),
                ..Default::default()
            },
        };
        self.send(response).await
    }

    fn progress_tick(&mut self) {
        for (watch_id, options) in &mut self.options {
            if !options.progress_notify {
                continue;
            }
            if options.sent_since_tick {
                options.sent_since_tick = false;
            } else {
                self.stream.request_progress(*watch_id);
            }
        }
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        match delivery {
            Delivery::Events {
                watch_id,
                revision,
                mut events,
            } => {
                let Some(options) = self.options.get_mut(&watch_id) else {
                    // Canceled while its events were on their way.
                    return Ok(());
                };
                options.sent_since_tick = true;
                let fragment = options.fragment;
                if options.prev_kv {
                    fill_prev_kv(self.server.mvcc(), &mut events);
                }
                let response = WatchResponse {
                    header: self.server.header(revision),
                    watch_id,
                    events,
                    ..Default::default()
                };
                if fragment {
                    // etcd fragments at the request limit plus gRPC's overhead allowance.
                    let limit = self.server.limits().max_request_bytes + super::GRPC_OVERHEAD_BYTES;
                    for part in fragments(response, limit) {
                        self.send(part).await?;
                    }
                    Ok(())
                } else {
                    self.send(response).await
                }
            }
            Delivery::Compacted {
                watch_id,
                compact_revision,
            } => {
                self.options.remove(&watch_id);
                // etcd sends this response with a zero header revision.
                self.send(WatchResponse {
                    header: self.server.header(0).map(|mut header| {
                        header.revision = 0;
                        header
                    }),
                    watch_id,
                    compact_revision,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Delivery::Progress { watch_id, revision } => {
                self.send(WatchResponse {
                    header: self.server.header(revision),
                    watch_id,
                    ..Default::default()
                })
                .await
            }
        }
    }
}

/// Adds each event's previous value, read at the revision before it, as etcd does
/// (not for creations; nothing when that revision is compacted).
fn fill_prev_kv(mvcc: &mvcc::Mvcc, events: &mut [Event]) {
    let view = mvcc.read();
    for event in events {
        let Some(kv) = &event.kv else { continue };
        if event.r#type == EventType::Put as i32 && kv.version == 1 {
            continue;
        }
        let request = RangeRequest {
            key: kv.key.clone(),
            revision: kv.mod_revision - 1,
            ..Default::default()
        };
        if let Ok(found) = mvcc::range(&view, &request) {
            event.prev_kv = found.kvs.into_iter().next();
        }
    }
}

/// Splits a response into fragments of at most `limit` bytes (one event at least
/// each); all but the last carry `fragment`, as etcd's sendFragments does.
fn fragments(response: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if response.encoded_len() < limit || response.events.len() < 2 {
        return vec![response];
    }
    let mut parts = Vec::new();
    let mut template = response;
    let events = std::mem::take(&mut template.events);
    let mut current = WatchResponse {
        fragment: true,
        ..template.clone()
    };
    for event in events {
        current.events.push(event);
        if current.events.len() > 1 && current.encoded_len() >= limit {
            let overflow = current.events.pop().expect("just pushed");
            let full = std::mem::replace(
                &mut current,
                WatchResponse {
                    fragment: true,
                    ..template.clone()
                },
            );
            parts.push(full);
            current.events.push(overflow);
        }
    }
    current.fragment = false;
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::mvccpb::KeyValue;

    fn event(size: usize) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: b"k".to_vec(),
                value: vec![b'v'; size],
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn large_responses_fragment_and_small_ones_do_not() {
        let response = WatchResponse {
            watch_id: 3,
            events: (0..10).map(|_| event(100)).collect(),
            ..Default::default()
        };
        assert_eq!(fragments(response.clone(), 1 << 20), vec![response.clone()]);
        let parts = fragments(response, 350);
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 10);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(parts.iter().all(|p| p.watch_id == 3));
    }
}
