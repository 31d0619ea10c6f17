#!/usr/bin/env bash
# Rerun every measurement in docs/performance.md (about 30 minutes on 2 cores).
# Tables go to stdout; JSON reports to var/perf/. Needs Redis, and PostgreSQL for
# the runs named *-pg (PG_URL, default the local server's `bench` database,
# created here when missing). Uses var/bench.sqlite3 for the SQLite runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBUG="${DEBUG:-1}"
out=var/perf
mkdir -p "$out"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/bench}"
manage() { .venv/bin/python manage.py "$@"; }
bench() { local name="$1"; shift; echo "=== $name: chatbench $*"; manage chatbench --json "$out/$name.json" "$@"; }
rates=20,40,60,80,100,120,140,160,180,200,240,280,320,360,400,480,560

# 1. Stalls: find-max with each second's p50 / p99 / max and server CPU, one
#    room of 200 sockets: one user with 5 senders, and 10 users with 50 senders,
#    on SQLite and on PostgreSQL.
bench stall-1user-sqlite --sockets 200 --users 1 --senders 5 --find-max --duration 5 --rates "$rates" --timeline
bench stall-10users-sqlite --sockets 200 --users 10 --senders 50 --find-max --duration 5 --rates "$rates" --timeline
psql -h 127.0.0.1 -U postgres -tc "select 1 from pg_database where datname = 'bench'" | grep -q 1 \
  || createdb -h 127.0.0.1 -U postgres bench
bench stall-1user-pg --database-url "$PG_URL" --sockets 200 --users 1 --senders 5 --find-max --duration 5 \
  --rates "$rates" --timeline
bench stall-10users-pg --database-url "$PG_URL" --sockets 200 --users 10 --senders 50 --find-max --duration 5 \
  --rates "$rates" --timeline
# 2. Capacity: the same find-max (10 users, 10 senders), then the tutorial-shaped baseline.
bench capacity --sockets 200 --find-max --duration 5 --rates "$rates" --baseline
# 3. Cost per delivery at 200 sockets, 20 msg/s, beside the baseline; and with a
#    browser's permessage-deflate offer, declined (as served) and accepted.
bench cost --sockets 200 --rate 20 --duration 10 --baseline
bench cost-deflate-offered --sockets 200 --rate 20 --duration 10 --deflate
bench cost-deflate-accepted --sockets 200 --rate 20 --duration 10 --deflate --server uvicorn-deflate
# 4. 10,000 sockets on one process, 100 rooms: 1 msg/s per room, idle (30 s with nothing sent), and nearly idle.
bench 10k --sockets 10000 --rooms 100 --rate 1 --senders 1 --duration 40 --timeline
bench 10k-idle --sockets 10000 --rooms 100 --rate 0.025 --senders 1 --duration 40 --idle 30 --timeline
# 5. 1,000 long-polls woken by one message.
echo "=== pollbench --polls 1000"
manage pollbench --polls 1000 | tee "$out/pollbench.txt"
# 6. A reconnect storm: 5,000 sockets on one of two processes, which is killed.
echo "=== stormbench --processes 2 --sockets 5000 --rooms 10"
manage stormbench --processes 2 --sockets 5000 --rooms 10 --json "$out/storm-5000.json"
# Servers compared at the same load.
for server in uvicorn uvicorn-legacy-ws daphne; do
  bench "server-$server" --server "$server" --sockets 200 --rate 20 --duration 10
done
