#!/usr/bin/env bash
# kvstore on a real Kubernetes without an operator (e2e/manifests/kvstore-statefulset.yaml):
# three Pods on three nodes form a cluster; a deleted Pod comes back on its volume with
# every key; a SIGKILLed container is restarted by its kubelet; losing the node of a
# follower leaves the other two serving writes, and the node rejoins when it returns.
# Every write acknowledged during the faults is read back at the end.
#
#   e2e/tests/statefulset.sh IMAGE_TAG     (a cluster from `e2e/kube up`, the image loaded)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KUBE=$HERE/../kube
TAG=${1:?usage: statefulset.sh IMAGE_TAG}
NS=e2e-sts-$$
NAME=statefulset
# shellcheck source=../lib.sh
. "$HERE/../lib.sh"
pod_endpoint() { echo "$1.kv-peer.$NS.svc.cluster.local:2379"; }
all_ready() { [ "$(ready_pods kv)" = "$1" ]; }
nodes_of_pods() { k get pods -l app.kubernetes.io/instance=kv -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u | wc -l; }
started_members() { etcdctl_at "$client" member list | grep -c ', started, '; }
restarts_of() { k get pod "$1" -o jsonpath='{.status.containerStatuses[0].restartCount}'; }

"$KUBE" exec kubectl create namespace "$NS" > /dev/null
trap '"$KUBE" exec kubectl delete namespace "$NS" --wait=false > /dev/null 2>&1 || true' EXIT
sed "s/IMAGE_TAG/$TAG/" "$HERE/../manifests/kvstore-statefulset.yaml" | k apply --server-side -f - > /dev/null

# 1. A cluster forms: three Pods Ready, on three nodes, three started members.
check "3 Pods Running and Ready" eventually 120 'all_ready 3'
check "the Pods are on 3 different nodes" test "$(nodes_of_pods)" = 3
client=$(k get service kv-client -o jsonpath='{.spec.clusterIP}'):2379
check "member list shows 3 started members" eventually 30 '[ "$(started_members)" = 3 ]'

# 2. A put through the client Service's ClusterIP is read through each Pod's DNS name.
etcdctl_at "$client" put /e2e/first one > /dev/null
for pod in kv-0 kv-1 kv-2; do
  check "get through $pod's DNS name" test "$(etcdctl_at "$(pod_endpoint "$pod")" get /e2e/first --print-value-only)" = one
done

# A writer through the client Service for the rest of the test; every put it
# had acknowledged must be there at the end.
writer "$client" &
writer_pid=$!

# 3. A deleted Pod comes back on its volume and rejoins with every key.
uid_before=$(k get pod kv-1 -o jsonpath='{.metadata.uid}')
k delete pod kv-1 --wait=false > /dev/null
check "deleted kv-1 is recreated" eventually 60 '[ "$(k get pod kv-1 -o jsonpath={.metadata.uid})" != "$uid_before" ]'
check "all Ready again after the Pod deletion" eventually 90 'all_ready 3'
check "the recreated kv-1 has the first key (its volume kept it)" \
  eventually 30 '[ "$(etcdctl_at "$(pod_endpoint kv-1)" get /e2e/first --print-value-only --consistency=s)" = one ]'
check "still 3 started members" eventually 30 '[ "$(started_members)" = 3 ]'

# 4. A container killed with SIGKILL is restarted by its kubelet.
node=$(k get pod kv-2 -o jsonpath='{.spec.nodeName}')
container=$(k get pod kv-2 -o jsonpath='{.status.containerStatuses[0].containerID}')
restarts=$(restarts_of kv-2)
"$KUBE" ctr "$node" tasks kill -s SIGKILL "${container#containerd://}"
check "the kubelet restarts the SIGKILLed container" eventually 60 '[ "$(restarts_of kv-2)" -gt "$restarts" ]'
check "all Ready again after the SIGKILL" eventually 90 'all_ready 3'

# 5. The node of a follower is lost: the others keep serving writes; it comes back.
leader_id=$(etcdctl_at "$client" endpoint status -w json | python3 -c 'import json,sys; print("%x" % json.load(sys.stdin)[0]["Status"]["leader"])')
follower=$(etcdctl_at "$client" member list | awk -F', ' -v leader="$leader_id" '$1 != leader {print $3; exit}')
follower_node=$(k get pod "$follower" -o jsonpath='{.spec.nodeName}')
echo "stopping $follower_node, the node of follower $follower (leader $leader_id)"
"$KUBE" stop-node "$follower_node" > /dev/null
before=$(wc -l < "$acked")
sleep 10
after=$(wc -l < "$acked")
check "writes are acknowledged while $follower_node is down ($((after - before)) in 10 s)" test "$after" -ge $((before + 3))
"$KUBE" start-node "$follower_node" > /dev/null
check "$follower is Ready again after its node returned" eventually 120 'all_ready 3'
check "$follower has caught up with the writes made while it was down" \
  eventually 60 '[ "$(etcdctl_at "$(pod_endpoint "$follower")" get "/e2e/acked/$after" --print-value-only --consistency=s)" = "$after" ]'

# 6. Every acknowledged write is there.
check_acknowledged "$writer_pid" "$client"

finish
