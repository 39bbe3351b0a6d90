//! Watchers, organised as etcd's watchable store does:
//! - A *synced* watcher has seen every event up to the newest notified revision; the
//!   apply layer hands it new events directly ([`WatchHub::notify`]), without blocking:
//!   a stream whose queue is full loses its place in the synced group.
//! - An *unsynced* watcher (new, resumed from an old revision, or fallen behind)
//!   catches up from stored history, a bounded chunk at a time, driven by its own
//!   stream's reader ([`WatchStream::next`]). So a slow reader costs memory for one
//!   queue and one chunk, never the writers' time.
//!
//! Per watcher, events arrive in revision order, without duplicates or gaps, and a
//! revision is never split across two deliveries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, Notify};

use super::{KeyRange, Mvcc, Revision};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::storage::{Storage, CF_KV};

/// Deliveries a stream may have queued before its watchers fall back to catching up.
const STREAM_QUEUE: usize = 64;
/// Event bytes a stream may have queued (beyond one delivery) before the same.
const STREAM_QUEUE_BYTES: usize = 4 << 20;
/// Bytes of history one catch-up step reads at most (a revision is never split).
const CATCH_UP_BYTES: usize = 1 << 20;
/// The watch ID a progress response for a whole stream carries.
pub const STREAM_PROGRESS_ID: i64 = -1;

/// What a watch asks for.
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// The watch ID the client chose; 0 lets the stream choose.
    pub watch_id: i64,
    /// First key (empty means "\0", the smallest key, as etcd treats it).
    pub key: Vec<u8>,
    /// etcd's range_end: empty for one key, "\0" for every key from `key`.
    pub range_end: Vec<u8>,
    /// First revision to deliver; 0 for "after the current revision".
    pub start_revision: i64,
    /// Leave out PUT events.
    pub no_put: bool,
    /// Leave out DELETE events.
    pub no_delete: bool,
}

/// Why a watch was refused, with etcd's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// `range_end` is not above `key`.
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
    /// The client reused a watch ID of this stream.
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
}

/// Something a stream's reader receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Events of one watcher, whole revisions, up to and including `revision`.
    Events {
        /// The watcher.
        watch_id: i64,
        /// Events are complete up to this revision.
        revision: i64,
        /// The events, in revision order.
        events: Vec<Event>,
    },
    /// The watcher wanted history below the compaction point; it is removed.
    Compacted {
        /// The watcher.
        watch_id: i64,
        /// The revision history is compacted at.
        compact_revision: i64,
    },
    /// Every event up to `revision` was delivered (to `watch_id`, or to all of the
    /// stream's watchers for [`STREAM_PROGRESS_ID`]).
    Progress {
        /// The watcher, or [`STREAM_PROGRESS_ID`].
        watch_id: i64,
        /// The revision.
        revision: i64,
    },
}

#[derive(Clone)]
struct Watcher {
    range: KeyRange,
    /// The first revision not yet delivered (for synced watchers: not yet delivered
    /// at the time it last received something; the hub's `notified` bounds the rest).
    next: i64,
    no_put: bool,
    no_delete: bool,
    synced: bool,
}

impl Watcher {
    fn wants(&self, event: &Event, revision: i64) -> bool {
        if revision < self.next {
            return false;
        }
        if event.r#type == EventType::Delete as i32 {
            !self.no_delete
        } else {
            !self.no_put
        }
    }
}

type WatcherKey = (u64, i64);
/// A span's bounds, as a map key.
type SpanBounds = (Vec<u8>, Option<Vec<u8>>);

/// Synced watchers grouped by what they watch, so one event is matched once per
/// distinct range rather than once per watcher.
#[derive(Default)]
struct Groups {
    single: HashMap<Vec<u8>, HashSet<WatcherKey>>,
    spans: HashMap<SpanBounds, HashSet<WatcherKey>>,
}

impl Groups {
    fn add(&mut self, range: &KeyRange, key: WatcherKey) {
        match range {
            KeyRange::Single(k) => self.single.entry(k.clone()).or_default().insert(key),
            KeyRange::Span { start, end } => self
                .spans
                .entry((start.clone(), end.clone()))
                .or_default()
                .insert(key),
        };
    }

    fn remove(&mut self, range: &KeyRange, key: WatcherKey) {
        match range {
            KeyRange::Single(k) => {
                if let Some(set) = self.single.get_mut(k) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.single.remove(k);
                    }
                }
            }
            KeyRange::Span { start, end } => {
                let group = (start.clone(), end.clone());
                if let Some(set) = self.spans.get_mut(&group) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.spans.remove(&group);
                    }
                }
            }
        }
    }
}

struct StreamEntry {
    queue: mpsc::Sender<Delivery>,
    /// Event bytes in the queue, shared with the reader.
    queued_bytes: Arc<AtomicUsize>,
    wake: Arc<Notify>,
    watchers: HashMap<i64, Watcher>,
    next_id: i64,
    progress: HashSet<i64>,
}

#[derive(Default)]
struct HubState {
    /// The newest revision handed to synced watchers.
    notified: i64,
    streams: HashMap<u64, StreamEntry>,
    synced: Groups,
}

impl HubState {
    fn unsync(&mut self, key: WatcherKey, next: Option<i64>) {
        let Some(stream) = self.streams.get_mut(&key.0) else {
            return;
        };
        let Some(watcher) = stream.watchers.get_mut(&key.1) else {
            return;
        };
        if watcher.synced {
            watcher.synced = false;
            if let Some(next) = next {
                watcher.next = next;
            } else {
                watcher.next = watcher.next.max(self.notified + 1);
            }
            self.synced.remove(&watcher.range, key);
            stream.wake.notify_one();
        }
    }
}

/// All watchers of one member.
#[derive(Default)]
pub struct WatchHub {
    state: Mutex<HubState>,
    next_stream: AtomicU64,
    watchers: AtomicUsize,
}

fn matches(range: &KeyRange, key: &[u8]) -> bool {
    match range {
        KeyRange::Single(k) => k == key,
        KeyRange::Span { start, end } => {
            key >= start.as_slice() && end.as_ref().is_none_or(|end| key < end.as_slice())
        }
    }
}

/// What a delivery's events weigh in the queue.
fn events_bytes(events: &[Event]) -> usize {
    events
        .iter()
        .map(|event| {
            event
                .kv
                .as_ref()
                .map_or(0, |kv| kv.key.len() + kv.value.len())
                + 32
        })
        .sum()
}

/// The revision an event happened at.
pub fn event_revision(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

impl WatchHub {
    /// A hub whose history starts after `current_revision`.
    pub fn new(current_revision: i64) -> WatchHub {
        WatchHub {
            state: Mutex::new(HubState {
                notified: current_revision,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Whether any watcher exists (the apply layer collects events only then).
    pub fn has_watchers(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Hands the events of newly committed revisions (up to `current`) to synced
    /// watchers. `None` means events were not collected: synced watchers that may
    /// have missed some catch up from storage instead.
    pub fn notify(&self, events: Option<&[Event]>, current: i64) {
        let mut state = self.state.lock();
        let previous = state.notified;
        if current <= previous {
            return;
        }
        let Some(events) = events else {
            let keys: Vec<WatcherKey> = state
                .synced
                .single
                .values()
                .chain(state.synced.spans.values())
                .flatten()
                .copied()
                .collect();
            for key in keys {
                state.unsync(key, Some(previous + 1));
            }
            state.notified = current;
            return;
        };
        let mut matched: HashMap<WatcherKey, Vec<usize>> = HashMap::new();
        for (index, event) in events.iter().enumerate() {
            let Some(kv) = &event.kv else { continue };
            if let Some(keys) = state.synced.single.get(&kv.key) {
                for key in keys {
                    matched.entry(*key).or_default().push(index);
                }
            }
        }
        for ((start, end), keys) in &state.synced.spans {
            let range = KeyRange::Span {
                start: start.clone(),
                end: end.clone(),
            };
            let hits: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, event)| event.kv.as_ref().is_some_and(|kv| matches(&range, &kv.key)))
                .map(|(index, _)| index)
                .collect();
            if hits.is_empty() {
                continue;
            }
            for key in keys {
                matched.entry(*key).or_default().extend_from_slice(&hits);
            }
        }
        let mut fallen_behind = Vec::new();
        for (key, mut indexes) in matched {
            let Some(stream) = state.streams.get_mut(&key.0) else {
                continue;
            };
            let Some(watcher) = stream.watchers.get_mut(&key.1) else {
                continue;
            };
            indexes.sort_unstable();
            indexes.dedup();
            let selected: Vec<Event> = indexes
                .into_iter()
                .map(|index| &events[index])
                .filter(|event| watcher.wants(event, event_revision(event)))
                .cloned()
                .collect();
            let Some(first) = selected.first().map(event_revision) else {
                continue;
            };
            let bytes = events_bytes(&selected);
            let queued = stream.queued_bytes.load(Ordering::Relaxed);
            if queued > 0 && queued + bytes > STREAM_QUEUE_BYTES {
                fallen_behind.push((key, first));
                continue;
            }
            let delivery = Delivery::Events {
                watch_id: key.1,
                revision: current,
                events: selected,
            };
            match stream.queue.try_send(delivery) {
                Ok(()) => {
                    stream.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
                    watcher.next = current + 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => fallen_behind.push((key, first)),
                // The stream is going away and will remove its watchers.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        for (key, first) in fallen_behind {
            state.unsync(key, Some(first));
        }
        state.notified = current;
    }

    /// The store's history was replaced (a snapshot was installed): every watcher
    /// catches up from storage.
    pub fn restore(&self, current: i64) {
        let mut state = self.state.lock();
        let keys: Vec<WatcherKey> = state
            .streams
            .iter()
            .flat_map(|(stream, entry)| entry.watchers.keys().map(move |id| (*stream, *id)))
            .collect();
        for key in keys {
            state.unsync(key, None);
        }
        state.notified = current;
    }

    /// The number of watchers.
    pub fn watcher_count(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// One stream of watches (a gRPC Watch call, or a server-side recipe): creates and
/// cancels watchers and yields their deliveries in order.
pub struct WatchStream {
    mvcc: Weak<Mvcc>,
    id: u64,
    queue: mpsc::Receiver<Delivery>,
    queued_bytes: Arc<AtomicUsize>,
    wake: Arc<Notify>,
    ready: VecDeque<Delivery>,
}

impl Mvcc {
    /// Opens a new watch stream.
    pub fn watch_stream(self: &Arc<Mvcc>) -> WatchStream {
        let hub = &self.hub;
        let id = hub.next_stream.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(STREAM_QUEUE);
        let wake = Arc::new(Notify::new());
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        hub.state.lock().streams.insert(
            id,
            StreamEntry {
                queue: sender,
                queued_bytes: queued_bytes.clone(),
                wake: wake.clone(),
                watchers: HashMap::new(),
                next_id: 0,
                progress: HashSet::new(),
            },
        );
        WatchStream {
            mvcc: Arc::downgrade(self),
            id,
            queue: receiver,
            queued_bytes,
            wake,
            ready: VecDeque::new(),
        }
    }

    /// The watch hub.
    pub fn hub(&self) -> &WatchHub {
        &self.hub
    }

    /// The newest revision handed to watchers.
    pub fn hub_revision(&self) -> i64 {
        self.hub.state.lock().notified
    }
}

/// One stored change, as an event.
fn decode_event(storage: &Storage, key: &[u8], value: &[u8]) -> Option<(Revision, Event)> {
    let (revision, tombstone) = Revision::from_key(key)?;
    let event = if tombstone {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: super::tombstone_key(storage, revision, value).ok()?,
                mod_revision: revision.main,
                ..Default::default()
            }),
            prev_kv: None,
        }
    } else {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue::decode(value).ok()?),
            prev_kv: None,
        }
    };
    Some((revision, event))
}

impl WatchStream {
    fn with_state<T>(&self, f: impl FnOnce(&mut HubState, &Arc<Mvcc>) -> T) -> Option<T> {
        let mvcc = self.mvcc.upgrade()?;
        let mut state = mvcc.hub.state.lock();
        Some(f(&mut state, &mvcc))
    }

    /// Creates a watcher; returns its ID and the revision it was created at (the
    /// header revision of etcd's "created" response).
    pub fn watch(&self, spec: &WatchSpec) -> Result<(i64, i64), WatchError> {
        let key = if spec.key.is_empty() {
            vec![0]
        } else {
            spec.key.clone()
        };
        if !spec.range_end.is_empty() && spec.range_end != [0] && key >= spec.range_end {
            return Err(WatchError::EmptyRange);
        }
        let range = KeyRange::new(&key, &spec.range_end);
        let stream_id = self.id;
        self.with_state(|state, mvcc| {
            let notified = state.notified;
            let Some(stream) = state.streams.get_mut(&stream_id) else {
                return Err(WatchError::DuplicateId);
            };
            let id = if spec.watch_id == 0 {
                while stream.watchers.contains_key(&stream.next_id) {
                    stream.next_id += 1;
                }
                stream.next_id += 1;
                stream.next_id - 1
            } else if stream.watchers.contains_key(&spec.watch_id) {
                return Err(WatchError::DuplicateId);
            } else {
                spec.watch_id
            };
            let next = if spec.start_revision > 0 {
                spec.start_revision
            } else {
                notified + 1
            };
            stream.watchers.insert(
                id,
                Watcher {
                    range,
                    next,
                    no_put: spec.no_put,
                    no_delete: spec.no_delete,
                    synced: false,
                },
            );
            stream.wake.notify_one();
            mvcc.hub.watchers.fetch_add(1, Ordering::Relaxed);
            Ok((id, notified))
        })
        .unwrap_or(Err(WatchError::DuplicateId))
    }

    /// Removes a watcher; false if it did not exist.
    pub fn cancel(&self, watch_id: i64) -> bool {
        let stream_id = self.id;
        self.with_state(|state, mvcc| {
            let Some(stream) = state.streams.get_mut(&stream_id) else {
                return false;
            };
            let Some(watcher) = stream.watchers.remove(&watch_id) else {
                return false;
            };
            stream.progress.remove(&watch_id);
            if watcher.synced {
                state.synced.remove(&watcher.range, (stream_id, watch_id));
            }
            mvcc.hub.watchers.fetch_sub(1, Ordering::Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Asks for a progress delivery for `watch_id` (sent if it is synced), or with
    /// [`STREAM_PROGRESS_ID`] for the whole stream (sent once all are synced).
    pub fn request_progress(&self, watch_id: i64) {
        let stream_id = self.id;
        self.with_state(|state, _| {
            if let Some(stream) = state.streams.get_mut(&stream_id) {
                stream.progress.insert(watch_id);
                stream.wake.notify_one();
            }
        });
    }

    /// The next delivery. Cancel-safe: nothing is lost if the future is dropped.
    /// Returns None once the store is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Some(delivery);
            }
            match self.queue.try_recv() {
                Ok(delivery) => return Some(self.dequeued(delivery)),
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
            // Only with the queue drained: what it held for a watcher precedes
            // anything catching up produces for the same watcher.
            if self.catch_up()? {
                continue;
            }
            if self.progress()? {
                continue;
            }
            tokio::select! {
                delivery = self.queue.recv() => return delivery.map(|d| self.dequeued(d)),
                _ = self.wake.notified() => {}
            }
        }
    }

    fn dequeued(&self, delivery: Delivery) -> Delivery {
        if let Delivery::Events { events, .. } = &delivery {
            self.queued_bytes
                .fetch_sub(events_bytes(events), Ordering::Relaxed);
        }
        delivery
    }

    /// Turns pending progress requests into deliveries; true if it queued any.
    fn progress(&mut self) -> Option<bool> {
        let stream_id = self.id;
        let ready = self.with_state(|state, _| {
            let notified = state.notified;
            let stream = state.streams.get_mut(&stream_id)?;
            let all_synced = stream.watchers.values().all(|w| w.synced);
            let mut ready = Vec::new();
            let pending: Vec<i64> = stream.progress.iter().copied().collect();
            for id in pending {
                if id == STREAM_PROGRESS_ID {
                    if all_synced {
                        stream.progress.remove(&id);
                        ready.push(Delivery::Progress {
                            watch_id: id,
                            revision: notified,
                        });
                    }
                    continue;
                }
                stream.progress.remove(&id);
                if stream.watchers.get(&id).is_some_and(|w| w.synced) {
                    ready.push(Delivery::Progress {
                        watch_id: id,
                        revision: notified,
                    });
                }
            }
            Some(ready)
        })?;
        let ready = ready.unwrap_or_default();
        let any = !ready.is_empty();
        self.ready.extend(ready);
        Some(any)
    }

    /// One bounded step of catching up this stream's unsynced watchers from stored
    /// history; true if there were any.
    fn catch_up(&mut self) -> Option<bool> {
        let mvcc = self.mvcc.upgrade()?;
        let stream_id = self.id;
        let (notified, pending) = {
            let state = mvcc.hub.state.lock();
            let Some(stream) = state.streams.get(&stream_id) else {
                return Some(false);
            };
            let pending: Vec<(i64, Watcher)> = stream
                .watchers
                .iter()
                .filter(|(_, w)| !w.synced)
                .map(|(id, w)| (*id, w.clone()))
                .collect();
            (state.notified, pending)
        };
        if pending.is_empty() {
            return Some(false);
        }
        // Read under the index lock, so compaction cannot remove what is being read.
        let reader = mvcc.read();
        let compact = super::ReadView::compact_revision(&reader);
        let mut compacted = Vec::new();
        let mut active = Vec::new();
        for (id, watcher) in pending {
            if watcher.next < compact {
                compacted.push(id);
            } else {
                active.push((id, watcher));
            }
        }
        let first = active
            .iter()
            .map(|(_, w)| w.next)
            .min()
            .unwrap_or(notified + 1);
        let mut end = notified;
        let mut history: Vec<Event> = Vec::new();
        if first <= notified {
            let storage = mvcc.storage();
            let start = Revision::new(first, 0).to_key(false);
            let iterator = storage.db().iterator_cf(
                storage.cf(CF_KV),
                rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
            );
            let mut bytes = 0;
            for item in iterator {
                let Ok((key, value)) = item else {
                    // Unreadable storage: deliver nothing now; the next wake retries.
                    tracing::warn!("cannot read history for watchers; retrying later");
                    return Some(false);
                };
                let Some((revision, event)) = decode_event(storage, &key, &value) else {
                    continue;
                };
                if revision.main > notified {
                    break;
                }
                if bytes >= CATCH_UP_BYTES && revision.sub == 0 {
                    end = revision.main - 1;
                    break;
                }
                bytes += key.len() + value.len();
                history.push(event);
            }
        }
        drop(reader);

        for id in &compacted {
            self.ready.push_back(Delivery::Compacted {
                watch_id: *id,
                compact_revision: compact,
            });
        }
        for (id, watcher) in &active {
            let events: Vec<Event> = history
                .iter()
                .filter(|event| {
                    let revision = event_revision(event);
                    revision <= end
                        && watcher.wants(event, revision)
                        && event
                            .kv
                            .as_ref()
                            .is_some_and(|kv| matches(&watcher.range, &kv.key))
                })
                .cloned()
                .collect();
            if !events.is_empty() {
                self.ready.push_back(Delivery::Events {
                    watch_id: *id,
                    revision: end,
                    events,
                });
            }
        }

        let mut state = mvcc.hub.state.lock();
        let now_notified = state.notified;
        let HubState {
            streams, synced, ..
        } = &mut *state;
        let Some(stream) = streams.get_mut(&stream_id) else {
            return Some(true);
        };
        for id in compacted {
            if stream.watchers.remove(&id).is_some() {
                mvcc.hub.watchers.fetch_sub(1, Ordering::Relaxed);
            }
        }
        for (id, ..) in active {
            let Some(watcher) = stream.watchers.get_mut(&id) else {
                continue;
            };
            if watcher.synced {
                continue;
            }
            if watcher.next <= end {
                watcher.next = end + 1;
            }
            if watcher.next > now_notified {
                watcher.synced = true;
                synced.add(&watcher.range, (stream_id, id));
            }
        }
        Some(true)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let stream_id = self.id;
        self.with_state(|state, mvcc| {
            if let Some(stream) = state.streams.remove(&stream_id) {
                for (id, watcher) in stream.watchers {
                    if watcher.synced {
                        state.synced.remove(&watcher.range, (stream_id, id));
                    }
                    mvcc.hub.watchers.fetch_sub(1, Ordering::Relaxed);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::tests::{open, put};

    fn delete(mvcc: &Mvcc, key: &str) -> i64 {
        let mut writer = mvcc.write();
        writer
            .delete_range(&KeyRange::new(key.as_bytes(), b""), false)
            .unwrap();
        let revision = writer.end_revision();
        writer.commit().unwrap();
        revision
    }

    fn prefix(key: &str) -> WatchSpec {
        let mut end = key.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        WatchSpec {
            key: key.as_bytes().to_vec(),
            range_end: end,
            ..Default::default()
        }
    }

    /// Every event delivered to `watch_id` until `last` revision was seen.
    async fn collect(
        stream: &mut WatchStream,
        watch_id: i64,
        last: i64,
    ) -> Vec<(i64, i32, Vec<u8>)> {
        let mut seen: Vec<(i64, i32, Vec<u8>)> = Vec::new();
        while seen.last().map(|(revision, ..)| *revision) != Some(last) {
            let delivery = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
                .await
                .expect("delivery in time")
                .expect("store alive");
            if let Delivery::Events {
                watch_id: id,
                events,
                ..
            } = delivery
            {
                assert_eq!(id, watch_id);
                for event in events {
                    let kv = event.kv.unwrap();
                    seen.push((kv.mod_revision, event.r#type, kv.key));
                }
            }
        }
        seen
    }

    #[tokio::test]
    async fn new_events_and_history_arrive_in_order() {
        let (_dir, mvcc) = open();
        put(&mvcc, "a/1", "x"); // 2
        put(&mvcc, "b", "x"); // 3
        delete(&mvcc, "a/1"); // 4
        let mut stream = mvcc.watch_stream();
        let (id, created_at) = stream
            .watch(&WatchSpec {
                start_revision: 1,
                ..prefix("a/")
            })
            .unwrap();
        assert_eq!((id, created_at), (0, 4));
        put(&mvcc, "a/2", "y"); // 5
        let seen = collect(&mut stream, id, 5).await;
        let revisions: Vec<i64> = seen.iter().map(|(r, ..)| *r).collect();
        assert_eq!(revisions, vec![2, 4, 5]);
        assert_eq!(seen[1].1, EventType::Delete as i32);
        // Synced now: the next write comes straight from the apply path.
        put(&mvcc, "a/3", "z");
        assert_eq!(collect(&mut stream, id, 6).await.len(), 1);
    }

    #[tokio::test]
    async fn a_stalled_stream_falls_behind_and_catches_up_without_gaps() {
        let (_dir, mvcc) = open();
        let mut stream = mvcc.watch_stream();
        let (id, _) = stream.watch(&prefix("k")).unwrap();
        // Become synced.
        put(&mvcc, "k0", "v");
        collect(&mut stream, id, 2).await;
        // Nobody reads while many more revisions than the queue holds are written.
        let mut last = 0;
        for i in 0..(STREAM_QUEUE * 4) {
            last = put(&mvcc, &format!("k{i}"), "v");
        }
        {
            let state = mvcc.hub.state.lock();
            assert!(!state.streams[&stream.id].watchers[&id].synced);
        }
        let seen = collect(&mut stream, id, last).await;
        let revisions: Vec<i64> = seen.iter().map(|(r, ..)| *r).collect();
        let expected: Vec<i64> = (3..=last).collect();
        assert_eq!(revisions, expected);
    }

    #[tokio::test]
    async fn filters_ids_and_errors() {
        let (_dir, mvcc) = open();
        let mut stream = mvcc.watch_stream();
        let (id, _) = stream
            .watch(&WatchSpec {
                key: b"k".to_vec(),
                no_put: true,
                watch_id: 7,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            stream.watch(&WatchSpec {
                key: b"k".to_vec(),
                watch_id: 7,
                ..Default::default()
            }),
            Err(WatchError::DuplicateId)
        );
        assert_eq!(
            stream.watch(&WatchSpec {
                key: b"b".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            }),
            Err(WatchError::EmptyRange)
        );
        put(&mvcc, "k", "1");
        let revision = delete(&mvcc, "k");
        let seen = collect(&mut stream, 7, revision).await;
        assert_eq!(
            seen,
            vec![(revision, EventType::Delete as i32, b"k".to_vec())]
        );
        assert!(stream.cancel(7));
        assert!(!stream.cancel(7));
        assert_eq!(mvcc.hub().watcher_count(), 0);
    }

    #[tokio::test]
    async fn history_below_compaction_cancels_the_watcher() {
        let (_dir, mvcc) = open();
        put(&mvcc, "k", "1");
        put(&mvcc, "k", "2");
        put(&mvcc, "k", "3");
        let mut writer = mvcc.write();
        writer.compact(3).unwrap();
        writer.commit().unwrap();
        let mut stream = mvcc.watch_stream();
        let (id, _) = stream
            .watch(&WatchSpec {
                key: b"k".to_vec(),
                start_revision: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            stream.next().await,
            Some(Delivery::Compacted {
                watch_id: id,
                compact_revision: 3
            })
        );
        assert_eq!(mvcc.hub().watcher_count(), 0);
        stream.request_progress(STREAM_PROGRESS_ID);
        assert_eq!(
            stream.next().await,
            Some(Delivery::Progress {
                watch_id: STREAM_PROGRESS_ID,
                revision: 4
            })
        );
    }
}
