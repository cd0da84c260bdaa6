#!/bin/sh
# One Redis Sentinel watching the queue's Redis (docker-compose.sentinel.yml). Its config file is
# written once, in its volume, and then belongs to Sentinel, which records there the master it
# follows now, the replicas and the other Sentinels it found, and the epoch: a Sentinel that
# restarts after a failover keeps following the new master.
#
#   SENTINEL_MASTER_NAME  the name clients ask for: TOKENBUS_SENTINEL_MASTER (default tokenbus)
#   SENTINEL_MASTER_HOST  the master at first start (a name: resolve-hostnames is on)
#   SENTINEL_MASTER_PORT  default 6379
#   SENTINEL_QUORUM       Sentinels that must agree the master is down (default 2 of 3)
#   SENTINEL_DOWN_AFTER   milliseconds without an answer before a node counts as down (default 5000)
#   SENTINEL_PORT         default 26379
#   SENTINEL_CONF         default /data/sentinel.conf
# Further arguments go to redis-server --sentinel.
set -eu

conf=${SENTINEL_CONF:-/data/sentinel.conf}
name=${SENTINEL_MASTER_NAME:-tokenbus}
if [ ! -f "$conf" ]; then
    {
        echo "port ${SENTINEL_PORT:-26379}"
        # names, not IPs, in and out: compose's addresses change when containers are re-created
        echo "sentinel resolve-hostnames yes"
        echo "sentinel announce-hostnames yes"
        echo "sentinel monitor $name ${SENTINEL_MASTER_HOST:?"the master's host"} ${SENTINEL_MASTER_PORT:-6379} ${SENTINEL_QUORUM:-2}"
        echo "sentinel down-after-milliseconds $name ${SENTINEL_DOWN_AFTER:-5000}"
        echo "sentinel failover-timeout $name 60000"
        echo "sentinel parallel-syncs $name 1"
    } >"$conf"
fi
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server "$conf" --sentinel "$@"
fi
exec redis-server "$conf" --sentinel "$@"
