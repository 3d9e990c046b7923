#!/usr/bin/env bash
# Start the local PostgreSQL, MariaDB and Redis the integration tests use, if they are down,
# and wait until each answers. Prints what it did; exits non-zero if one never came up.
set -uo pipefail

wait_for() {  # name, command
    for _ in $(seq 1 60); do
        if eval "$2" >/dev/null 2>&1; then echo "services: $1 is up"; return 0; fi
        sleep 0.5
    done
    echo "services: $1 did not come up" >&2
    return 1
}

status=0
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
wait_for PostgreSQL "pg_isready -h 127.0.0.1 -p 5432" || status=1

if ! mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; then
    echo "services: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
fi
wait_for MariaDB "mariadb-admin -h 127.0.0.1 -uroot ping" || status=1
mariadb -h 127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test" >/dev/null 2>&1 || true

if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    echo "services: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi
wait_for Redis "redis-cli -h 127.0.0.1 ping" || status=1
exit $status
