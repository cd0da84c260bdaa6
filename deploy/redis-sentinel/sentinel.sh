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
#   SENTINEL_AUTH_PASS    the data nodes' password (sentinel auth-pass), set again at every start
# Further arguments go to redis-server --sentinel.
# The Sentinel itself asks for no password: tokenbus (redis-py's Sentinel client) authenticates
# with the data nodes, not with the Sentinels, which hold no data (README "The queue behind Sentinel").
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
# the password follows .env: the line of an earlier start (or of Sentinel's rewrite) is replaced,
# after the monitor line it refers to
grep -v "^sentinel auth-pass $name " "$conf" >"$conf.new" || true
echo "sentinel auth-pass $name ${SENTINEL_AUTH_PASS:?"the data nodes' password"}" >>"$conf.new"
mv "$conf.new" "$conf"
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server "$conf" --sentinel "$@"
fi
exec redis-server "$conf" --sentinel "$@"
