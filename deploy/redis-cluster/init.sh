#!/bin/sh
# One-shot: make a Redis Cluster of the nodes in REDIS_CLUSTER_NODES, once.
# docker-compose.cluster.yml runs it after every `up`; it is safe to run again:
#   - the cluster already says cluster_state:ok        -> nothing to do
#   - the nodes already form a cluster (restarting)    -> wait for cluster_state:ok, create nothing
#   - every node is empty (no peer, no slot)           -> redis-cli --cluster create ... --cluster-yes
# It never re-creates over a cluster that exists: a node that lost its data is added by hand
# (redis-cli --cluster add-node NEW EXISTING --cluster-slave), as the message says.
#
#   REDIS_CLUSTER_NODES     host:port of every node, space-separated (hostnames or IPs)
#   REDIS_CLUSTER_REPLICAS  replicas per master (default 1: 6 nodes = 3 masters + 3 replicas)
#   REDIS_CLUSTER_WAIT      seconds to wait for the nodes to answer and the cluster to be ok (default 60)
set -eu

nodes=${REDIS_CLUSTER_NODES:?"host:port of every node, space-separated"}
replicas=${REDIS_CLUSTER_REPLICAS:-1}
wait_s=${REDIS_CLUSTER_WAIT:-60}
deadline=$(($(date +%s) + wait_s))

say() { echo "redis-cluster-init: $*" >&2; }
cli() { node=$1; shift; redis-cli -h "${node%:*}" -p "${node##*:}" "$@"; }
# one field of CLUSTER INFO (its lines end in \r\n)
info() { cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
late() { [ "$(date +%s)" -ge "$deadline" ]; }

for node in $nodes; do
    until [ "$(cli "$node" ping 2>/dev/null)" = PONG ]; do
        if late; then say "$node does not answer after ${wait_s}s"; exit 1; fi
        sleep 1
    done
done

# every node says cluster_state:ok and knows (by gossip) at least the nodes listed
wait_ok() {
    count=0
    for node in $nodes; do count=$((count + 1)); done
    for node in $nodes; do
        until [ "$(info "$node" cluster_state)" = ok ] && [ "$(info "$node" cluster_known_nodes)" -ge "$count" ]; do
            if late; then
                say "$node: cluster_state is not ok after ${wait_s}s (redis-cli --cluster check $node)"
                exit 1
            fi
            sleep 1
        done
    done
}

formed=""
fresh=""
for node in $nodes; do
    if [ "$(info "$node" cluster_known_nodes)" = 1 ] && [ "$(info "$node" cluster_slots_assigned)" = 0 ]; then
        fresh="$fresh $node"
    else
        formed="$formed $node"
    fi
done

if [ -n "$formed" ]; then
    if [ -n "$fresh" ]; then
        # a node that lost its data (or a new one): joining it is a decision, not a restart
        say "not part of the cluster:$fresh; add each with: redis-cli --cluster add-node NODE${formed%% *} --cluster-slave"
        nodes=$formed
    fi
    say "the nodes already form a cluster; waiting for cluster_state:ok"
    wait_ok
    say "cluster ok; nothing created"
    exit 0
fi

# CLUSTER MEET takes IP addresses, not names: each node's own address, as it sees this connection
# (CLIENT INFO's laddr), so compose service names work without a resolver in the image.
addresses=""
for node in $nodes; do
    laddr=$(cli "$node" client info | sed -n 's/.* laddr=\([^ ]*\) .*/\1/p')
    if [ -z "$laddr" ]; then say "$node did not tell its address (CLIENT INFO needs Redis 6.2 or later)"; exit 1; fi
    addresses="$addresses $laddr"
done
say "creating the cluster of$addresses with $replicas replica(s) per master"
# shellcheck disable=SC2086  # one argument per address
redis-cli --cluster create $addresses --cluster-replicas "$replicas" --cluster-yes
wait_ok
say "cluster ok"
