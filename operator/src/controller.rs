//! The KvCluster controller: validate, observe the members, pick one membership
//! step, build every child with the pure builders, server-side apply them under one
//! field manager, then write status and Events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::children::{self, Join, Names};
use crate::crd::{Condition, KvCluster, KvClusterStatus, MemberStatus};
use crate::members::{self, Observed, Step};
use crate::metrics::Metrics;

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "kvstore-operator";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub default_image: String,
    pub members: members::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    Invalid(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("membership: {0}")]
    Membership(String),
}

impl Error {
    /// The label the failure metric counts it under.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Kube(_) => "kube",
            Error::Membership(_) => "membership",
        }
    }
}

/// Runs the controller until the process ends.
pub async fn run(context: Arc<Context>) {
    let client = context.client.clone();
    let clusters: Api<KvCluster> = Api::all(client.clone());
    Controller::new(clusters, watcher::Config::default())
        .owns(
            Api::<StatefulSet>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(
            Api::<PodDisruptionBudget>::all(client.clone()),
            watcher::Config::default(),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile ended with an error");
            }
        })
        .await;
}

/// An invalid spec waits for the next change; anything else is retried soon.
fn error_policy(cluster: Arc<KvCluster>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failure(error.reason());
    tracing::warn!(cluster = %cluster.name_any(), %error, "reconcile failed");
    match error {
        Error::Invalid(_) => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

async fn reconcile(cluster: Arc<KvCluster>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&cluster, &context).await;
    context.metrics.reconciled(started.elapsed());
    result
}

/// The condition list with `condition` set, keeping its transition time when its
/// status did not change.
fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(old) => {
            condition.last_transition_time = if old.status == condition.status {
                old.last_transition_time.clone()
            } else {
                Some(now)
            };
            *old = condition;
        }
        None => {
            condition.last_transition_time = Some(now);
            conditions.push(condition);
        }
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: generation,
    }
}

async fn reconcile_inner(cluster: &KvCluster, context: &Context) -> Result<Action, Error> {
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let name = cluster.name_any();
    let names = Names::of(cluster);
    let client = &context.client;
    let status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    let clusters: Api<KvCluster> = Api::namespaced(client.clone(), &namespace);

    if let Err(problem) = children::validate(cluster) {
        let mut status = status.clone();
        status.phase = Some("Invalid".into());
        status.observed_generation = generation;
        status.selector = Some(names.selector_string());
        set_condition(
            &mut status.conditions,
            condition("Degraded", true, "InvalidSpec", problem.clone(), generation),
        );
        write_status(&clusters, &name, &status).await?;
        publish(
            context,
            cluster,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            &problem,
        )
        .await;
        return Err(Error::Invalid(problem));
    }

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let existing = statefulsets.get_opt(&name).await?;
    let desired = cluster.spec.replicas as usize;
    let pods = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .map(|r| r as usize);
    let probe = pods.unwrap_or(0).max(desired);
    let urls: Vec<String> = (0..probe).map(|i| names.client_url(i)).collect();
    let observed = context
        .members
        .observe(&urls, |url| names.ordinal_of(url))
        .await;

    // Until the founding members have formed a cluster, they are started together
    // and bootstrap as new; from then on a member on an empty volume joins.
    let bootstrapped = status.bootstrapped
        || (!observed.members.is_empty() && observed.members.iter().all(|m| m.healthy));
    let (join, replicas, step) = if !bootstrapped {
        let size = bootstrap_size(client, &namespace, &names, desired).await?;
        (Join::New { size }, size as i32, None)
    } else {
        let step = members::plan(desired, pods.unwrap_or(0), &observed);
        let mut ordinals: Vec<usize> = observed.members.iter().filter_map(|m| m.ordinal).collect();
        if let Step::AddLearner { ordinal } = step {
            ordinals.push(ordinal);
        }
        let replicas = match &step {
            Step::Pods(n) => *n,
            _ => pods.unwrap_or(desired) as i32,
        };
        // Without an answer, keep the bootstrap settings already written.
        let join = if observed.members.is_empty() {
            current_join(client, &namespace, &names).await?
        } else {
            Join::Existing { ordinals }
        };
        (join, replicas, Some(step))
    };

    // The step's membership call goes first, so the ConfigMap applied below lists
    // a learner before its Pod starts.
    if let Some(step) = &step {
        carry_out(context, cluster, &names, &observed, step).await?;
    }
    apply_children(context, cluster, &join, replicas).await?;

    let mut status = status;
    let was_bootstrapped = status.bootstrapped;
    status.bootstrapped = bootstrapped;
    status.observed_generation = generation;
    status.selector = Some(names.selector_string());
    status.replicas = observed.members.len() as i32;
    status.ready_replicas = observed.healthy() as i32;
    status.cluster_id = observed.cluster_id.map(|id| format!("{id:x}"));
    status.leader = observed
        .leader
        .and_then(|id| observed.member(id))
        .and_then(|m| m.ordinal)
        .map(|o| names.pod(o));
    status.version = observed
        .members
        .iter()
        .filter_map(|m| m.version.clone())
        .min();
    status.members = observed
        .members
        .iter()
        .map(|m| MemberStatus {
            name: m.name.clone(),
            id: format!("{:x}", m.id),
            peer_urls: m.peer_urls.clone(),
            client_urls: m.client_urls.clone(),
            is_leader: observed.leader == Some(m.id),
            is_learner: m.learner,
            healthy: m.healthy,
        })
        .collect();
    let (phase, requeue) = report(&mut status, cluster, &observed, step.as_ref(), generation);
    let old_leader = cluster.status.as_ref().and_then(|s| s.leader.clone());
    if status.leader.is_some() && status.leader != old_leader {
        context.metrics.leader_changed(&namespace, &name);
        if old_leader.is_some() {
            let note = format!(
                "the leader is now {}",
                status.leader.clone().unwrap_or_default()
            );
            publish(
                context,
                cluster,
                EventType::Normal,
                "LeaderChanged",
                "Observe",
                &note,
            )
            .await;
        }
    }
    if bootstrapped && !was_bootstrapped {
        let note = format!("{} members formed the cluster", observed.members.len());
        publish(
            context,
            cluster,
            EventType::Normal,
            "Bootstrapped",
            "Bootstrap",
            &note,
        )
        .await;
    }
    let old_phase = cluster.status.as_ref().and_then(|s| s.phase.clone());
    status.phase = Some(phase.clone());
    if old_phase.as_deref() != Some(phase.as_str()) {
        let note = format!("phase {phase}");
        publish(
            context,
            cluster,
            EventType::Normal,
            &phase,
            "Reconcile",
            &note,
        )
        .await;
    }
    context
        .metrics
        .members(&namespace, &name, status.replicas, status.ready_replicas);
    write_status(&clusters, &name, &status).await?;
    Ok(Action::requeue(requeue))
}

/// The founding size: what the ConfigMap already says, so a change of
/// `spec.replicas` during bootstrap does not change the initial cluster under the
/// members; `desired` when there is none yet.
async fn bootstrap_size(
    client: &Client,
    namespace: &str,
    names: &Names<'_>,
    desired: usize,
) -> Result<usize, Error> {
    match current_join(client, namespace, names).await? {
        Join::New { size } if size > 0 => Ok(size),
        _ => Ok(desired),
    }
}

/// The bootstrap settings in the cluster's ConfigMap, if any.
async fn current_join(client: &Client, namespace: &str, names: &Names<'_>) -> Result<Join, Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let Some(map) = maps.get_opt(&names.bootstrap_config()).await? else {
        return Ok(Join::New { size: 0 });
    };
    let data = map.data.unwrap_or_default();
    let ordinals: Vec<usize> = data
        .get("ETCD_INITIAL_CLUSTER")
        .map(|list| {
            list.split(',')
                .filter_map(|entry| {
                    entry
                        .split_once('=')
                        .and_then(|(_, url)| names.ordinal_of(url))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(
        match data.get("ETCD_INITIAL_CLUSTER_STATE").map(String::as_str) {
            Some("existing") => Join::Existing { ordinals },
            _ => Join::New {
                size: ordinals.len(),
            },
        },
    )
}

/// Makes one membership call, and says so in an Event.
async fn carry_out(
    context: &Context,
    cluster: &KvCluster,
    names: &Names<'_>,
    observed: &Observed,
    step: &Step,
) -> Result<(), Error> {
    let (reason, note, peer_url) = match step {
        Step::AddLearner { ordinal } => (
            "MemberAdded",
            format!("added {} as a learner", names.pod(*ordinal)),
            Some(names.peer_url(*ordinal)),
        ),
        Step::Promote { id } => ("MemberPromoted", format!("promoted learner {id:x}"), None),
        Step::Remove { id } => ("MemberRemoved", format!("removed member {id:x}"), None),
        Step::MoveLeader { to } => ("LeaderMoved", format!("moved leadership to {to:x}"), None),
        Step::Steady | Step::Wait(_) | Step::Pods(_) => return Ok(()),
    };
    // Through a healthy member that stays (the leader is asked to move itself).
    let via = match step {
        Step::MoveLeader { .. } => observed.leader.and_then(|id| observed.member(id)),
        Step::Remove { id } => observed
            .members
            .iter()
            .find(|m| m.healthy && m.id != *id && !m.learner),
        _ => observed.members.iter().find(|m| m.healthy && !m.learner),
    };
    let via = via
        .and_then(|m| m.ordinal)
        .ok_or_else(|| Error::Membership("no healthy member to ask".into()))?;
    match context
        .members
        .apply(&names.client_url(via), step, peer_url)
        .await
    {
        Ok(()) => {
            tracing::info!(cluster = %cluster.name_any(), "{note}");
            publish(
                context,
                cluster,
                EventType::Normal,
                reason,
                "Membership",
                &note,
            )
            .await;
            Ok(())
        }
        // A learner not yet caught up, or a member connected for less than etcd's
        // five seconds: normal while members start. Try again soon.
        Err(message)
            if (matches!(step, Step::Promote { .. }) && message.contains("in sync"))
                || message == "etcdserver: unhealthy cluster" =>
        {
            tracing::info!(cluster = %cluster.name_any(), "{note}: not yet ({message})");
            Ok(())
        }
        Err(message) => {
            let note = format!("{note} failed: {message}");
            publish(
                context,
                cluster,
                EventType::Warning,
                reason,
                "Membership",
                &note,
            )
            .await;
            Err(Error::Membership(note))
        }
    }
}

/// Server-side applies every child under the operator's field manager.
async fn apply_children(
    context: &Context,
    cluster: &KvCluster,
    join: &Join,
    replicas: i32,
) -> Result<(), Error> {
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let client = &context.client;
    let params = PatchParams::apply(MANAGER).force();
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    for service in [
        children::peer_service(cluster),
        children::client_service(cluster),
    ] {
        apply(&services, service, &params).await?;
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    apply(&maps, children::bootstrap_config(cluster, join), &params).await?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    apply(
        &statefulsets,
        children::statefulset(cluster, replicas, &context.default_image),
        &params,
    )
    .await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    apply(&budgets, children::disruption_budget(cluster), &params).await?;
    Ok(())
}

async fn apply<K>(api: &Api<K>, object: K, params: &PatchParams) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut value = serde_json::to_value(&object).expect("objects serialize");
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(&name, params, &Patch::Apply(value)).await?;
    Ok(())
}

/// Sets the conditions from what was observed and the step taken: the phase, and
/// when to look again.
fn report(
    status: &mut KvClusterStatus,
    cluster: &KvCluster,
    observed: &Observed,
    step: Option<&Step>,
    generation: Option<i64>,
) -> (String, Duration) {
    let desired = cluster.spec.replicas;
    let voters = observed.members.iter().filter(|m| !m.learner).count() as i32;
    let healthy_voters = observed
        .members
        .iter()
        .filter(|m| m.healthy && !m.learner)
        .count() as i32;
    let available =
        voters > 0 && healthy_voters >= children::quorum(voters) && observed.leader.is_some();
    let even = if desired % 2 == 0 {
        format!(
            "; {desired} members tolerate {} failures, as {} would",
            (desired - 1) / 2,
            desired - 1
        )
    } else {
        String::new()
    };
    let available_message = if available {
        format!(
            "{healthy_voters} of {voters} voting members are healthy and there is a leader{even}"
        )
    } else if observed.members.is_empty() {
        "no member answers yet".into()
    } else {
        format!(
            "{healthy_voters} of {voters} voting members are healthy; a quorum needs {}",
            children::quorum(voters.max(1))
        )
    };
    set_condition(
        &mut status.conditions,
        condition(
            "Available",
            available,
            if available {
                "QuorumHealthy"
            } else {
                "QuorumUnavailable"
            },
            available_message,
            generation,
        ),
    );
    let (progressing, reason, message) = match step {
        None => (
            true,
            "Bootstrapping",
            "the founding members are starting".to_string(),
        ),
        Some(Step::Steady) => (
            false,
            "Steady",
            format!("{} members, as the spec asks", observed.members.len()),
        ),
        Some(Step::Wait(why)) => (true, "Waiting", why.clone()),
        Some(other) => (
            true,
            "Scaling",
            format!(
                "{} of {desired} members; next: {other:?}",
                observed.members.len()
            ),
        ),
    };
    set_condition(
        &mut status.conditions,
        condition("Progressing", progressing, reason, message, generation),
    );
    let unhealthy: Vec<String> = observed
        .members
        .iter()
        .filter(|m| !m.healthy)
        .map(|m| {
            if m.name.is_empty() {
                format!("{:x}", m.id)
            } else {
                m.name.clone()
            }
        })
        .collect();
    let degraded = !unhealthy.is_empty() && step.is_some();
    set_condition(
        &mut status.conditions,
        condition(
            "Degraded",
            degraded,
            if degraded {
                "MembersUnhealthy"
            } else {
                "AllHealthy"
            },
            if degraded {
                format!("unhealthy: {}", unhealthy.join(", "))
            } else {
                "every member is healthy".into()
            },
            generation,
        ),
    );
    let phase = match step {
        None => "Creating",
        Some(Step::Steady) if degraded => "Degraded",
        Some(Step::Steady) => "Running",
        Some(Step::Wait(_)) if !available => "Degraded",
        Some(Step::Wait(_)) => "Waiting",
        Some(_) => "Scaling",
    };
    let requeue = match step {
        Some(Step::Steady) if !degraded => Duration::from_secs(30),
        _ => Duration::from_secs(2),
    };
    (phase.to_string(), requeue)
}

async fn write_status(
    clusters: &Api<KvCluster>,
    name: &str,
    status: &KvClusterStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "kvstore.dev/v1alpha1",
        "kind": "KvCluster",
        "status": status,
    });
    clusters
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

async fn publish(
    context: &Context,
    cluster: &KvCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = context
        .recorder
        .publish(&event, &cluster.object_ref(&()))
        .await
    {
        tracing::warn!(%error, reason, "could not publish an event");
    }
}

/// The reporter Events carry.
pub fn reporter() -> Reporter {
    Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}
