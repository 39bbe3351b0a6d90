//! Membership: what the cluster's members say about themselves (through etcd's
//! Cluster and Maintenance APIs, via `etcd-api`), and the planner that picks the one
//! safe change to make next. The planner is a pure function; the controller carries
//! out its step and comes back.

use std::time::Duration;

use etcd_api::client::Dialer;
use etcd_api::etcdserverpb::cluster_client::ClusterClient;
use etcd_api::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_api::etcdserverpb::{
    MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    MoveLeaderRequest, StatusRequest,
};
use tonic::transport::Channel;

/// How long one call to a member may take before it counts as unhealthy.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A member as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// The StatefulSet ordinal its peer URL names; None for a URL that is not one
    /// of this cluster's Pods.
    pub ordinal: Option<usize>,
    pub learner: bool,
    /// It answered a Status call, with a leader and no alarms or errors.
    pub healthy: bool,
    /// Its Raft index, when it answered.
    pub raft_index: Option<u64>,
    /// The version it reports, when it answered.
    pub version: Option<String>,
}

/// What the operator observed of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The membership, from a member that answered; empty when none did.
    pub members: Vec<Member>,
    pub leader: Option<u64>,
    pub cluster_id: Option<u64>,
}

impl Observed {
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Healthy members.
    pub fn healthy(&self) -> usize {
        self.members.iter().filter(|m| m.healthy).count()
    }
}

/// The next change, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Membership is what the spec asks for.
    Steady,
    /// Nothing can change safely now; why.
    Wait(String),
    /// Set the StatefulSet's replicas.
    Pods(i32),
    /// Add the member for Pod `ordinal` as a learner.
    AddLearner { ordinal: usize },
    /// Promote a learner that has caught up.
    Promote { id: u64 },
    /// Hand leadership to another voter before the leader is removed.
    MoveLeader { to: u64 },
    /// Remove a member (the highest ordinal).
    Remove { id: u64 },
}

/// The next membership change for `desired` members with the StatefulSet at `pods`
/// replicas. Scale up: add a learner, grow the StatefulSet, promote the learner once
/// it caught up. Scale down: move leadership off the member that goes, remove it,
/// shrink the StatefulSet. Nothing changes while a member is unhealthy, except that
/// a learner is still promoted or grown into (it is the change in progress).
pub fn plan(desired: usize, pods: usize, observed: &Observed) -> Step {
    if observed.members.is_empty() {
        return Step::Wait("no member answers".into());
    }
    if let Some(stranger) = observed.members.iter().find(|m| m.ordinal.is_none()) {
        return Step::Wait(format!(
            "member {:x} ({}) is not one of this cluster's Pods; remove it with etcdctl",
            stranger.id,
            stranger.peer_urls.join(",")
        ));
    }
    let ordinal = |m: &Member| m.ordinal.expect("checked above");
    if let Some(learner) = observed.members.iter().find(|m| m.learner) {
        if ordinal(learner) >= pods {
            return Step::Pods(ordinal(learner) as i32 + 1);
        }
        return Step::Promote { id: learner.id };
    }
    let count = observed.members.len();
    let unhealthy: Vec<String> = observed
        .members
        .iter()
        .filter(|m| !m.healthy)
        .map(|m| format!("{:x}", m.id))
        .collect();
    let highest = observed.members.iter().map(ordinal).max().unwrap_or(0);
    if count == desired {
        if pods != highest + 1 {
            return Step::Pods(highest as i32 + 1);
        }
        return Step::Steady;
    }
    if !unhealthy.is_empty() {
        return Step::Wait(format!(
            "members {} are unhealthy; membership changes wait until every member is healthy",
            unhealthy.join(", ")
        ));
    }
    if observed.leader.is_none() {
        return Step::Wait("the cluster has no leader".into());
    }
    if count < desired {
        // Pods past the members (left by an earlier step) go first.
        if pods > highest + 1 {
            return Step::Pods(highest as i32 + 1);
        }
        let free = (0..).find(|i| !observed.members.iter().any(|m| ordinal(m) == *i));
        return Step::AddLearner {
            ordinal: free.expect("some ordinal is free"),
        };
    }
    let going = observed
        .members
        .iter()
        .max_by_key(|m| ordinal(m))
        .expect("members are not empty");
    if observed.leader == Some(going.id) {
        let to = observed
            .members
            .iter()
            .filter(|m| m.id != going.id)
            .min_by_key(|m| ordinal(m))
            .expect("more members than desired");
        return Step::MoveLeader { to: to.id };
    }
    Step::Remove { id: going.id }
}

/// Talks to one cluster's members.
pub struct Client {
    dialer: Dialer,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            dialer: Dialer::new(CALL_TIMEOUT),
        }
    }
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl Client {
    async fn channel(&self, url: &str) -> Result<Channel, String> {
        self.dialer.open(url).await.map_err(|e| e.to_string())
    }

    /// Asks the members at `urls` (the Pods' client URLs) for the membership and
    /// their status. `ordinal_of` maps a peer URL to its Pod.
    pub async fn observe(
        &self,
        urls: &[String],
        ordinal_of: impl Fn(&str) -> Option<usize>,
    ) -> Observed {
        let mut observed = Observed::default();
        let statuses = futures::future::join_all(urls.iter().map(|url| async move {
            let channel = self.channel(url).await.ok()?;
            timed(MaintenanceClient::new(channel).status(StatusRequest {}))
                .await
                .ok()
        }))
        .await;
        let mut list = None;
        for url in urls {
            let Ok(channel) = self.channel(url).await else {
                continue;
            };
            if let Ok(members) = timed(
                ClusterClient::new(channel).member_list(MemberListRequest { linearizable: true }),
            )
            .await
            {
                list = Some(members);
                break;
            }
        }
        let Some(list) = list else {
            return observed;
        };
        observed.cluster_id = list.header.map(|h| h.cluster_id);
        for member in list.members {
            let status = statuses
                .iter()
                .flatten()
                .find(|s| s.header.as_ref().is_some_and(|h| h.member_id == member.id));
            let healthy = status.is_some_and(|s| s.leader != 0 && s.errors.is_empty());
            if let Some(status) = status.filter(|s| s.leader != 0) {
                observed.leader = Some(status.leader);
            }
            observed.members.push(Member {
                id: member.id,
                name: member.name,
                ordinal: member.peer_ur_ls.first().and_then(|u| ordinal_of(u)),
                peer_urls: member.peer_ur_ls,
                client_urls: member.client_ur_ls,
                learner: member.is_learner,
                healthy,
                raft_index: status.map(|s| s.raft_index),
                version: status.map(|s| s.version.clone()),
            });
        }
        observed.members.sort_by_key(|m| m.ordinal);
        observed
    }

    /// Carries out a membership step through the member at `url`.
    pub async fn apply(
        &self,
        url: &str,
        step: &Step,
        peer_url: Option<String>,
    ) -> Result<(), String> {
        let channel = self.channel(url).await?;
        let mut cluster = ClusterClient::new(channel.clone());
        match step {
            Step::AddLearner { .. } => {
                let peer_url = peer_url.ok_or("no peer URL for the new member")?;
                timed(cluster.member_add(MemberAddRequest {
                    peer_ur_ls: vec![peer_url],
                    is_learner: true,
                }))
                .await
                .map(|_| ())
            }
            Step::Promote { id } => timed(cluster.member_promote(MemberPromoteRequest { id: *id }))
                .await
                .map(|_| ()),
            Step::Remove { id } => timed(cluster.member_remove(MemberRemoveRequest { id: *id }))
                .await
                .map(|_| ()),
            Step::MoveLeader { to } => timed(
                MaintenanceClient::new(channel).move_leader(MoveLeaderRequest { target_id: *to }),
            )
            .await
            .map(|_| ()),
            Step::Steady | Step::Wait(_) | Step::Pods(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, ordinal: usize, healthy: bool) -> Member {
        Member {
            id,
            name: format!("kv-{ordinal}"),
            peer_urls: vec![format!("http://kv-{ordinal}:2380")],
            client_urls: vec![],
            ordinal: Some(ordinal),
            learner: false,
            healthy,
            raft_index: Some(10),
            version: Some("3.6.0".into()),
        }
    }

    fn cluster(members: Vec<Member>, leader: u64) -> Observed {
        Observed {
            members,
            leader: Some(leader),
            cluster_id: Some(7),
        }
    }

    fn three() -> Vec<Member> {
        (0..3).map(|i| member(i as u64 + 1, i, true)).collect()
    }

    #[test]
    fn the_planner_takes_one_safe_step_at_a_time() {
        let mut learner = member(4, 3, true);
        learner.learner = true;
        let mut with_learner = three();
        with_learner.push(learner.clone());
        let mut sick = three();
        sick[1].healthy = false;
        let mut stranger = three();
        stranger[2].ordinal = None;
        let five: Vec<Member> = (0..5).map(|i| member(i as u64 + 1, i, true)).collect();
        let mut gap = three();
        gap[1].ordinal = Some(3);
        let cases: Vec<(&str, usize, usize, Observed, Step)> = vec![
            ("steady", 3, 3, cluster(three(), 1), Step::Steady),
            ("nobody answers", 3, 3, Observed::default(), Step::Wait("no member answers".into())),
            ("scale up adds a learner", 5, 3, cluster(three(), 1), Step::AddLearner { ordinal: 3 }),
            ("then grows the pods", 5, 3, cluster(with_learner.clone(), 1), Step::Pods(4)),
            ("then promotes", 5, 4, cluster(with_learner.clone(), 1), Step::Promote { id: 4 }),
            ("a learner is promoted even when asked for fewer", 3, 4, cluster(with_learner, 1), Step::Promote { id: 4 }),
            ("scale down removes the highest", 3, 5, cluster(five.clone(), 1), Step::Remove { id: 5 }),
            ("but moves the leader off it first", 3, 5, cluster(five.clone(), 5), Step::MoveLeader { to: 1 }),
            ("then shrinks the pods", 3, 5, cluster(three(), 1), Step::Pods(3)),
            ("an unhealthy member blocks scaling", 5, 3, cluster(sick.clone(), 1),
             Step::Wait("members 2 are unhealthy; membership changes wait until every member is healthy".into())),
            ("but not a steady cluster", 3, 3, cluster(sick, 1), Step::Steady),
            ("no leader blocks scaling", 5, 3, Observed { leader: None, ..cluster(three(), 1) },
             Step::Wait("the cluster has no leader".into())),
            ("a stranger blocks everything", 3, 3, cluster(stranger, 1),
             Step::Wait("member 3 (http://kv-2:2380) is not one of this cluster's Pods; remove it with etcdctl".into())),
            ("a free ordinal is reused", 4, 4, cluster(gap.clone(), 1), Step::AddLearner { ordinal: 1 }),
            ("extra pods go before an add", 4, 5, cluster(gap, 1), Step::Pods(4)),
            ("even sizes are allowed", 4, 3, cluster(three(), 1), Step::AddLearner { ordinal: 3 }),
            ("down to one", 1, 3, cluster(three(), 1), Step::Remove { id: 3 }),
        ];
        for (what, desired, pods, observed, expected) in cases {
            assert_eq!(plan(desired, pods, &observed), expected, "{what}");
        }
    }
}
