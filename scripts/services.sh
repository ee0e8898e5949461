#!/usr/bin/env bash
# Start the local services the tests use (Redis 127.0.0.1:6379, PostgreSQL 127.0.0.1:5432)
# when they are not already running. Uses the machine's Debian packages.
set -uo pipefail

redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

if ! redis_up; then
  echo "services: starting redis" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 1 50); do redis_up && break; sleep 0.2; done
fi
if ! pg_up; then
  echo "services: starting postgresql" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
fi
redis_up || echo "services: WARNING redis is not reachable on 127.0.0.1:6379" >&2
pg_up || echo "services: WARNING postgresql is not reachable on 127.0.0.1:5432" >&2
