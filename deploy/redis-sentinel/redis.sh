#!/bin/sh
# A data node of the queue's Redis behind Sentinel (docker-compose.sentinel.yml): the master, or
# with REDIS_REPLICA_OF its replica. The config file is written once, in the node's volume, and then
# belongs to Redis: Sentinel rewrites it (CONFIG REWRITE) when it promotes or re-points a node, so a
# node that restarts after a failover comes back in the role Sentinel gave it, not the one it was
# born with (which --replicaof on the command line would force, and a promoted master restarting
# as a replica of a stale node would throw its data away).
#
#   REDIS_ANNOUNCE_HOST  the name other containers reach this node by (its compose service name):
#                        what its master, and so the Sentinels, report for it as a replica
#   REDIS_REPLICA_OF     "host port" of the master to replicate at first start; unset: a master
#   REDIS_PORT           default 6379
#   REDIS_CONF           default /data/redis.conf (the volume; the image's working directory)
# Further arguments go to redis-server.
set -eu

conf=${REDIS_CONF:-/data/redis.conf}
if [ ! -f "$conf" ]; then
    {
        echo "port ${REDIS_PORT:-6379}"
        echo "appendonly yes"
        echo "appendfsync everysec"
        echo "replica-announce-ip ${REDIS_ANNOUNCE_HOST:?"the name this node is reached by"}"
        if [ -n "${REDIS_REPLICA_OF:-}" ]; then echo "replicaof $REDIS_REPLICA_OF"; fi
    } >"$conf"
fi
# the image's entrypoint, where there is one, runs redis-server as the redis user (it owns /data)
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server "$conf" "$@"
fi
exec redis-server "$conf" "$@"
