//! Runtime membership changes as etcd's Cluster service makes them, on the leader,
//! with etcd's strict reconfiguration checks: a change that would leave fewer
//! started (or connected) voters than a quorum is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};

use crate::config::MemberUrl;
use crate::error::EtcdError;
use crate::pb::etcdserverpb::Member;
use crate::server::{Error, EtcdServer};

/// A voter counts as connected when it answered the leader this recently.
const ACTIVE_WINDOW: Duration = Duration::from_secs(5);
/// etcd's HealthInterval: how long every voter must have been connected before a
/// member is added, or a connected voter removed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A learner is ready for promotion when it has this share of the leader's log.
const LEARNER_READY_PERCENT: u64 = 90;

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn change_error(error: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Error {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => EtcdError::NotLeader.into(),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            Error::Raft(error.to_string())
        }
        RaftError::Fatal(_) => EtcdError::Stopped.into(),
    }
}

/// Checks peer URLs as etcd does: each must be a valid http(s) URL.
fn parse_peer_urls(urls: &[String]) -> Result<Vec<String>, Error> {
    if urls.is_empty() {
        return Err(EtcdError::MemberBadUrls.into());
    }
    let mut parsed = Vec::new();
    for url in urls {
        let url: MemberUrl = url
            .parse()
            .map_err(|_| Error::Etcd(EtcdError::MemberBadUrls))?;
        parsed.push(url.to_string());
    }
    parsed.sort();
    Ok(parsed)
}

/// etcd's ID for a member added at runtime: SHA-1 over its sorted peer URLs and the
/// time of the addition.
fn added_member_id(peer_urls: &[String]) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    crate::ids::member_id(peer_urls, &now.to_string())
}

impl EtcdServer {
    /// Commits a membership change, waiting out one still in progress (openraft
    /// allows one at a time; etcd's callers never see that).
    async fn change(
        &self,
        changes: ChangeMembers<u64, BasicNode>,
        retain: bool,
    ) -> Result<(), Error> {
        for _ in 0..50 {
            match self.raft().change_membership(changes.clone(), retain).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(error) => return Err(change_error(error)),
            }
        }
        Err(EtcdError::Timeout.into())
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.raft().server_metrics().borrow().state == ServerState::Leader
    }

    /// The leader's peer URL, where followers pass Cluster calls on to.
    pub fn leader_peer_url(&self) -> Option<String> {
        let metrics = self.raft().metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|node| node.addr.clone())
    }

    fn active(&self, id: u64) -> bool {
        id == self.identity().member_id || self.peers().answered_within(id, ACTIVE_WINDOW)
    }

    /// Whether voter `id` has been connected for etcd's HealthInterval.
    fn healthy(&self, id: u64) -> bool {
        id == self.identity().member_id || self.peers().connected_for(id, HEALTH_INTERVAL)
    }

    fn current_nodes(&self) -> (BTreeMap<u64, BasicNode>, BTreeSet<u64>) {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let nodes = membership
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        (nodes, membership.voter_ids().collect())
    }

    /// MemberAdd: a learner, or a voter when enough voters are started to keep a
    /// quorum with it.
    pub async fn member_add(
        &self,
        peer_urls: &[String],
        is_learner: bool,
    ) -> Result<Member, Error> {
        let urls = parse_peer_urls(peer_urls)?;
        let (nodes, voters) = self.current_nodes();
        // etcd's order: the strict reconfiguration checks first, then the checks of
        // the change itself.
        if !is_learner {
            let started = voters.iter().filter(|id| self.active(**id)).count();
            if started < quorum(voters.len() + 1) {
                return Err(EtcdError::MemberNotEnoughStarted.into());
            }
        }
        if !voters.iter().all(|id| self.healthy(*id)) {
            return Err(EtcdError::Unhealthy.into());
        }
        if nodes.values().any(|node| urls.contains(&node.addr)) {
            return Err(EtcdError::PeerUrlExist.into());
        }
        if is_learner && nodes.len() - voters.len() >= 1 {
            return Err(EtcdError::TooManyLearners.into());
        }
        let id = added_member_id(&urls);
        if nodes.contains_key(&id) {
            return Err(EtcdError::MemberExist.into());
        }
        self.raft()
            .add_learner(id, BasicNode::new(urls[0].clone()), false)
            .await
            .map_err(change_error)?;
        if !is_learner {
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await?;
        }
        tracing::info!(member = %format!("{id:x}"), peer_urls = ?urls, is_learner, "added member");
        Ok(Member {
            id,
            name: String::new(),
            peer_ur_ls: urls,
            client_ur_ls: Vec::new(),
            is_learner,
        })
    }

    /// MemberRemove, refused as etcd refuses it: when the voters left connected would
    /// be fewer than a quorum of the new membership, or when removing a connected
    /// voter leaves too few voters that have been connected for a while.
    pub async fn member_remove(&self, id: u64) -> Result<(), Error> {
        let (nodes, voters) = self.current_nodes();
        if !nodes.contains_key(&id) {
            return Err(EtcdError::MemberNotFound.into());
        }
        let change = if voters.contains(&id) {
            let remaining: Vec<u64> = voters.iter().copied().filter(|v| *v != id).collect();
            let connected = remaining.iter().filter(|v| self.active(**v)).count();
            if remaining.is_empty() || connected < quorum(remaining.len()) {
                return Err(EtcdError::MemberNotEnoughStarted.into());
            }
            let down =
                id != self.identity().member_id && !self.peers().connected_for(id, Duration::ZERO);
            let healthy = voters.iter().filter(|v| self.healthy(**v)).count();
            if !down && healthy - 1 < quorum(voters.len() - 1) {
                return Err(EtcdError::Unhealthy.into());
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.change(change, false).await?;
        tracing::info!(member = %format!("{id:x}"), "removed member");
        Ok(())
    }

    /// MemberUpdate: new peer URLs for a member.
    pub async fn member_update(&self, id: u64, peer_urls: &[String]) -> Result<(), Error> {
        let urls = parse_peer_urls(peer_urls)?;
        let (nodes, _) = self.current_nodes();
        if !nodes.contains_key(&id) {
            return Err(EtcdError::MemberNotFound.into());
        }
        if nodes
            .iter()
            .any(|(other, node)| *other != id && urls.contains(&node.addr))
        {
            return Err(EtcdError::PeerUrlExist.into());
        }
        self.change(
            ChangeMembers::SetNodes(BTreeMap::from([(id, BasicNode::new(urls[0].clone()))])),
            true,
        )
        .await?;
        tracing::info!(member = %format!("{id:x}"), peer_urls = ?urls, "updated member");
        Ok(())
    }

    /// MemberPromote: a learner that has caught up with the leader becomes a voter.
    pub async fn member_promote(&self, id: u64) -> Result<(), Error> {
        let (nodes, voters) = self.current_nodes();
        if !nodes.contains_key(&id) {
            return Err(EtcdError::MemberNotFound.into());
        }
        if voters.contains(&id) {
            return Err(EtcdError::MemberNotLearner.into());
        }
        let metrics = self.raft().metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        let matched = metrics
            .replication
            .as_ref()
            .and_then(|replication| replication.get(&id).cloned().flatten())
            .map_or(0, |log_id| log_id.index);
        if matched * 100 < last * LEARNER_READY_PERCENT || !self.active(id) {
            return Err(EtcdError::LearnerNotReady.into());
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await?;
        tracing::info!(member = %format!("{id:x}"), "promoted learner");
        Ok(())
    }
}
