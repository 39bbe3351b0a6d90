# Helpers the scenario tests in e2e/tests share (sourced, not run). The caller sets
# KUBE (the e2e/kube script), NS (its namespace) and NAME (what `finish` reports).

passed=0
failed=0

k() { "$KUBE" exec kubectl -n "$NS" "$@"; }
etcdctl_at() { local endpoint=$1; shift; "$KUBE" exec etcdctl --dial-timeout=3s --command-timeout=5s --endpoints="$endpoint" "$@"; }

pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*"; }
check() { # description command...
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
# Retries shell code (evaluated afresh each time) for up to `seconds`.
eventually() { # seconds code
  local seconds=$1 code=$2
  local deadline=$((SECONDS + seconds))
  until eval "$code" > /dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}
finish() {
  echo "$NAME: $passed passed, $failed failed"
  [ "$failed" = 0 ]
}

# Ready Pods of instance $1.
ready_pods() {
  k get pods -l "app.kubernetes.io/instance=$1" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -cx True
}

# A writer through endpoint $1: each acknowledged put of /e2e/acked/N is recorded
# in $acked, until $stop_writer exists. Start with `writer ENDPOINT &`.
acked=$(mktemp)
stop_writer=$(mktemp -u)
writer() {
  local n=0
  while [ ! -e "$stop_writer" ]; do
    n=$((n + 1))
    if etcdctl_at "$1" put "/e2e/acked/$n" "$n" > /dev/null 2>&1; then echo "$n" >> "$acked"; fi
    sleep 0.05
  done
}
# Stops the writer (pid $1) and checks every acknowledged write is there (read
# through endpoint $2).
check_acknowledged() {
  touch "$stop_writer"
  wait "$1" || true
  rm -f "$stop_writer"
  local total stored present missing
  total=$(wc -l < "$acked")
  stored=$(etcdctl_at "$2" get /e2e/acked/ --prefix --keys-only | grep '^/e2e/acked/' | sed 's|/e2e/acked/||' | sort || true)
  present=$(echo "$stored" | grep -c . || true)
  missing=$(comm -13 <(echo "$stored") <(sort "$acked") | wc -l)
  check "all $total acknowledged writes are present ($present keys, $missing missing)" test "$missing" = 0 -a "$total" -gt 0
  rm -f "$acked"
}
