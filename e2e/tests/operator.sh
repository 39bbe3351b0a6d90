#!/usr/bin/env bash
# kvstore-operator on a real Kubernetes: the CRD and a three-member KvCluster become
# a healthy cluster behind its client Service; `kubectl scale` to 5 and back to 3
# changes membership one member at a time with a writer running, and every
# acknowledged write is there at the end; a deleted Pod rejoins; an invalid spec is
# reported in a condition naming the field; deleting the KvCluster removes its
# children. The operator runs in the cluster's hub network namespace, with the
# admin kubeconfig, as a controller-manager would.
#
#   e2e/tests/operator.sh IMAGE_TAG    (a cluster from `e2e/kube up`, the image loaded;
#                                       KVSTORE_OPERATOR: the operator binary)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KUBE=$HERE/../kube
TAG=${1:?usage: operator.sh IMAGE_TAG}
OPERATOR=${KVSTORE_OPERATOR:?KVSTORE_OPERATOR names the kvstore-operator binary}
NS=e2e-op-$$
NAME=operator
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"

# The client Service by its DNS name (the hub resolves cluster names).
client=kv.$NS.svc.cluster.local:2379
# How many times the operator recorded Normal Event reason $1 for kv (repeats of one
# reason are kept as one Event with a series count).
events() {
  k get events.events.k8s.io -o json | python3 -c '
import json, sys
items = [e for e in json.load(sys.stdin)["items"]
         if e["regarding"].get("name") == "kv" and e["reason"] == sys.argv[1] and e["type"] == "Normal"]
print(sum((e.get("series") or {}).get("count", 1) for e in items))' "$1"
}
jpath() { k get kvc kv -o "jsonpath=$1"; }
condition() { jpath "{.status.conditions[?(@.type==\"$1\")].status}"; }
learners() { etcdctl_at "$client" member list | awk -F', ' '$6 == "true"' | wc -l; }
members() { etcdctl_at "$client" member list | wc -l; }
started() { etcdctl_at "$client" member list | grep -c ', started, '; }
sts_replicas() { k get statefulset kv -o 'jsonpath={.spec.replicas}'; }
# The cluster is settled at $1 members: status, membership and Pods agree.
settled() {
  [ "$(jpath '{.status.replicas}')" = "$1" ] && [ "$(jpath '{.status.readyReplicas}')" = "$1" ] &&
    [ "$(condition Available)" = True ] && [ "$(condition Progressing)" = False ] &&
    [ "$(started)" = "$1" ] && [ "$(learners)" = 0 ] && [ "$(sts_replicas)" = "$1" ] &&
    [ "$(ready_pods kv)" = "$1" ]
}

log=$(mktemp)
"$KUBE" exec kubectl create namespace "$NS" > /dev/null
"$KUBE" exec kubectl apply --server-side -f - < "$HERE/../../crds/kvcluster.yaml" > /dev/null
"$KUBE" exec kubectl wait --for=condition=Established crd/kvclusters.kvstore.dev --timeout=30s > /dev/null
"$KUBE" exec "$OPERATOR" run --default-image "kvstore.dev/kvstore:$TAG" --metrics-address 127.0.0.1:18080 > "$log" 2>&1 &
operator=$!
cleanup() {
  kill "$operator" 2> /dev/null || true
  "$KUBE" exec kubectl delete namespace "$NS" --wait=false > /dev/null 2>&1 || true
  if [ "$failed" != 0 ]; then
    echo "--- operator log (last 80 lines)"
    tail -n 80 "$log"
  fi
  rm -f "$log"
}
trap cleanup EXIT

# 1. A KvCluster becomes three healthy members with a leader.
k apply -f - > /dev/null <<'EOF'
apiVersion: kvstore.dev/v1alpha1
kind: KvCluster
metadata: {name: kv}
spec:
  replicas: 3
  imagePullPolicy: IfNotPresent
EOF
applied=$SECONDS
check "3 members Ready and Available" eventually 180 'settled 3'
echo "apply to Available (3 members): $((SECONDS - applied)) s"
check "the status names a leader Pod" eventually 10 '[[ "$(jpath "{.status.leader}")" == kv-[0-2] ]]'
check "the status has a cluster ID and a version" test -n "$(jpath '{.status.clusterId}')" -a -n "$(jpath '{.status.version}')"
check "kubectl get kvc prints the columns" eventually 10 'k get kvc kv | grep -Eq "^kv +3 +3 +kv-[0-2] +[0-9.]+ +Running"'
check "put and get through the client Service" \
  eventually 10 'etcdctl_at "$client" put /e2e/op one && [ "$(etcdctl_at "$client" get /e2e/op --print-value-only)" = one ]'
check "a PodDisruptionBudget keeps a quorum of 2" test "$(k get pdb kv -o 'jsonpath={.spec.minAvailable}')" = 2
check "the scale subresource reports the selector" \
  test "$(k get --raw "/apis/kvstore.dev/v1alpha1/namespaces/$NS/kvclusters/kv/scale" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["selector"])')" = "app.kubernetes.io/instance=kv,app.kubernetes.io/name=kvstore"

# 2. Scale to 5 and back to 3 with a writer running.
writer "$client" &
writer_pid=$!
scaled=$SECONDS
k scale kvc/kv --replicas=5 > /dev/null
check "scaled up to 5 members" eventually 300 'settled 5'
echo "3 -> 5: $((SECONDS - scaled)) s"
check "the PodDisruptionBudget follows to 3" test "$(k get pdb kv -o 'jsonpath={.spec.minAvailable}')" = 3
check "Events record two learners added and two promoted" \
  eventually 10 '[ "$(events MemberAdded)" = 2 ] && [ "$(events MemberPromoted)" = 2 ]'
scaled=$SECONDS
k scale kvc/kv --replicas=3 > /dev/null
check "scaled down to 3 members" eventually 300 'settled 3'
echo "5 -> 3: $((SECONDS - scaled)) s"
check "Events record two members removed" eventually 10 '[ "$(events MemberRemoved)" = 2 ]'
check "the removed members' Pods are gone" eventually 60 '[ "$(k get pods -l app.kubernetes.io/instance=kv -o name | wc -l)" = 3 ]'
check "the removed members' claims are gone" eventually 60 '[ "$(k get pvc -o name | grep -c "data-kv-[34]")" = 0 ]'

# 3. A deleted Pod comes back and rejoins.
uid_before=$(k get pod kv-1 -o jsonpath='{.metadata.uid}')
k delete pod kv-1 --wait=false > /dev/null
check "deleted kv-1 is recreated" eventually 60 '[ "$(k get pod kv-1 -o jsonpath={.metadata.uid})" != "$uid_before" ]'
check "the cluster settles at 3 again" eventually 120 'settled 3'

check_acknowledged "$writer_pid" "$client"

# 4. An invalid spec is reported in a condition naming the field.
k patch kvc kv --type=merge -p '{"spec":{"flags":{"data-dir":"/tmp"}}}' > /dev/null
check "an invalid flag is reported as Degraded naming spec.flags" \
  eventually 30 '[ "$(jpath "{.status.phase}")" = Invalid ] && jpath "{.status.conditions[?(@.type==\"Degraded\")].message}" | grep -q "^spec.flags: \"data-dir\""'
check "the schema refuses 12 replicas" bash -c "! '$KUBE' exec kubectl -n '$NS' patch kvc kv --type=merge -p '{\"spec\":{\"replicas\":12}}' 2>&1 | grep -q patched"
k patch kvc kv --type=json -p '[{"op":"remove","path":"/spec/flags"}]' > /dev/null
check "fixed, it settles again" eventually 60 'settled 3 && [ "$(jpath "{.status.phase}")" = Running ]'

# 5. The operator's metrics.
metrics=$("$KUBE" exec curl -sf http://127.0.0.1:18080/metrics || true)
check "the operator exports reconcile and member metrics" \
  bash -c 'grep -q "^kvstore_operator_reconciles_total [1-9]" <<< "$1" && grep -q "^kvstore_operator_cluster_healthy_members{name=\"kv\",namespace=\"'"$NS"'\"} 3" <<< "$1"' _ "$metrics"

# 6. Deleting the KvCluster removes its children.
k delete kvc kv --wait=true --timeout=60s > /dev/null
check "the StatefulSet, Services, ConfigMap and budget are gone" \
  eventually 60 '[ -z "$(k get statefulset,service,configmap,pdb -l app.kubernetes.io/instance=kv -o name)" ]'

finish
