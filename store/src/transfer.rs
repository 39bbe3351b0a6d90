//! Leadership transfer (etcd's MoveLeader) on openraft 0.9, which has no transfer
//! of its own. A voter refuses candidates while it has heard from the leader within
//! a leader lease, so the leader falls silent: it stops heartbeats, holds back new
//! proposals and read confirmations (each of which would reach the voters), waits
//! until the transferee has its whole log and the lease is over everywhere, and
//! then asks the transferee to campaign at once. The other voters' own election
//! timers run a random timeout past the lease, so the transferee is first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::watch;

use crate::error::EtcdError;
use crate::server::{Error, EtcdServer};

/// How long a transfer may take, in leader leases (etcd's client gives up first).
const TRANSFER_LEASES: u32 = 5;

/// Holds back proposals and read confirmations on a leader while it hands over.
pub struct TransferGate {
    busy: watch::Sender<bool>,
}

/// Open the gate again when dropped.
pub struct Closed<'a> {
    gate: &'a TransferGate,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.gate.busy.send_replace(false);
    }
}

impl TransferGate {
    pub fn new() -> Arc<TransferGate> {
        Arc::new(TransferGate {
            busy: watch::Sender::new(false),
        })
    }

    /// Whether a transfer is under way.
    pub fn in_progress(&self) -> bool {
        *self.busy.borrow()
    }

    /// Waits until no transfer is under way.
    pub async fn wait_open(&self) {
        if !self.in_progress() {
            return;
        }
        let mut busy = self.busy.subscribe();
        let _ = busy.wait_for(|busy| !*busy).await;
    }

    /// Closes the gate until the guard is dropped; None when a transfer is under way.
    pub fn close(&self) -> Option<Closed<'_>> {
        let mut closed = false;
        self.busy.send_if_modified(|busy| {
            closed = !*busy;
            *busy = true;
            closed
        });
        // Not then_some: a guard built and dropped would open the gate.
        if closed {
            Some(Closed { gate: self })
        } else {
            None
        }
    }
}

impl EtcdServer {
    /// MoveLeader: hands leadership to the voter `target`; this member must lead.
    pub async fn move_leader(&self, target: u64) -> Result<(), Error> {
        let me = self.identity().member_id;
        let closed = loop {
            let metrics = self.raft().metrics().borrow().clone();
            if metrics.state != ServerState::Leader {
                return Err(EtcdError::NotLeader.into());
            }
            let membership = metrics.membership_config.membership();
            if !membership.voter_ids().any(|id| id == target) {
                return Err(EtcdError::BadLeaderTransferee.into());
            }
            if target == me {
                return Ok(());
            }
            match self.transfer_gate().close() {
                Some(closed) => break closed,
                None => self.transfer_gate().wait_open().await,
            }
        };
        tracing::info!(
            current_leader = %format!("{me:x}"),
            transferee = %format!("{target:x}"),
            "leadership transfer starting"
        );
        let started = Instant::now();
        let raft = self.raft();
        raft.runtime_config().heartbeat(false);
        let outcome = self.hand_over(target).await;
        raft.runtime_config().heartbeat(true);
        drop(closed);
        match &outcome {
            Ok(()) => tracing::info!(
                old_leader = %format!("{me:x}"),
                new_leader = %format!("{target:x}"),
                took = ?started.elapsed(),
                "leadership transfer finished"
            ),
            Err(error) => tracing::warn!(
                transferee = %format!("{target:x}"),
                %error,
                "leadership transfer failed"
            ),
        }
        outcome
    }

    async fn hand_over(&self, target: u64) -> Result<(), Error> {
        let raft = self.raft();
        let config = raft.config();
        let lease = Duration::from_millis(config.election_timeout_max);
        let heartbeat = Duration::from_millis(config.heartbeat_interval);
        let deadline = Instant::now() + lease * TRANSFER_LEASES;
        let wait = || raft.wait(Some(deadline.saturating_duration_since(Instant::now())));
        let timed_out = |_| Error::Etcd(EtcdError::TimeoutLeaderTransfer);
        // The transferee must hold the whole log, or the voters would refuse it.
        let matched = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
            m.replication
                .as_ref()
                .and_then(|replication| replication.get(&target).cloned().flatten())
                .map(|log_id| log_id.index)
                >= m.last_log_index
        };
        let current = wait()
            .metrics(
                |m| m.state != ServerState::Leader || matched(m),
                "transferee caught up",
            )
            .await
            .map_err(timed_out)?;
        if current.state != ServerState::Leader {
            return Err(EtcdError::LeaderChanged.into());
        }
        let address = current
            .membership_config
            .membership()
            .get_node(&target)
            .map(|node| node.addr.clone())
            .ok_or(EtcdError::BadLeaderTransferee)?;
        // Every voter last heard from this leader before now: wait its lease out.
        tokio::time::sleep(lease + heartbeat).await;
        let mut client = self
            .peers()
            .client(&address)
            .map_err(|_| Error::Etcd(EtcdError::TimeoutLeaderTransfer))?;
        client
            .timeout_now(self.peers().caller().header().unwrap_or_default())
            .await
            .map_err(|status| {
                tracing::warn!(%status, "the transferee did not take the request to campaign");
                Error::Etcd(EtcdError::TimeoutLeaderTransfer)
            })?;
        wait()
            .metrics(
                |m| m.current_leader == Some(target) && m.vote.is_committed(),
                "transferee leads",
            )
            .await
            .map_err(timed_out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_pass_once_the_gate_opens() {
        let gate = TransferGate::new();
        gate.wait_open().await;
        let closed = gate.close().expect("open gate closes");
        assert!(gate.in_progress());
        assert!(gate.close().is_none());
        assert!(gate.in_progress());
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_open().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(closed);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter released")
            .unwrap();
        assert!(!gate.in_progress());
    }
}
