#!/bin/bash
# preStop hook of a Ray worker pod (node drain, scale-down, eviction, rollout).
#
# 1. `ray drain-node` marks this Ray node as draining with a deadline. Serve's controller
#    then migrates the node's replicas: it starts replacements on other nodes first, then
#    stops these replicas gracefully (they leave the routing tables, so no new session is
#    admitted here; each gets its deployment's graceful_shutdown_timeout_s to finish).
# 2. Wait until no Serve replica is left on this node, or the deadline passes; the
#    kubelet's terminationGracePeriodSeconds must be a little longer than the deadline.
set -u
DEADLINE="${FC_DRAIN_DEADLINE_S:-600}"
POLL="${FC_DRAIN_POLL_S:-10}"

log() { echo "fc-drain: $*" >&2; }

if ! ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION \
    --reason-message "pod ${HOSTNAME:-unknown} terminating" \
    --deadline-remaining-seconds "${DEADLINE}"; then
  log "ray drain-node failed (Ray already stopped?); exiting"
  exit 0
fi

end=$((SECONDS + DEADLINE))
while [ "${SECONDS}" -lt "${end}" ]; do
  left="$(python - <<'PY' 2>/dev/null
import ray
from ray.util.state import list_actors

ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
node = ray.get_runtime_context().get_node_id()
alive = list_actors(filters=[("node_id", "=", node), ("state", "=", "ALIVE")], limit=10000)
print(sum(1 for a in alive if a.class_name.startswith("ServeReplica")))
PY
)"
  if [ "${left}" = "0" ]; then
    log "no Serve replica left on this node"
    exit 0
  fi
  log "${left:-?} Serve replica(s) still on this node"
  sleep "${POLL}"
done
log "drain deadline of ${DEADLINE}s reached"
exit 0
