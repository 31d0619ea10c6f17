#!/usr/bin/env bash
# Rerun every measurement in docs/performance.md (about 10 minutes on 2 cores).
# Tables go to stdout; JSON reports to var/perf/. Needs Redis; uses var/bench.sqlite3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBUG="${DEBUG:-1}"
out=var/perf
mkdir -p "$out"
bench() { local name="$1"; shift; echo "=== $name: chatbench $*"; .venv/bin/python manage.py chatbench --json "$out/$name.json" "$@"; }

# 1. Capacity, 200 sockets in one room, ours and the tutorial-shaped baseline.
bench capacity --sockets 200 --find-max --duration 5 --rates 10,20,40,60,80,100,120,140,160,180,200,240,280 --baseline
# 2. Cost per delivery at 200 sockets, 20 msg/s, ours and the baseline.
bench cost --sockets 200 --rate 20 --duration 10 --baseline
# 3. Size: 500 sockets in one room; 2,000 sockets over 20 rooms.
bench size-500 --sockets 500 --rate 20 --duration 15
bench size-2000 --sockets 2000 --rooms 20 --rate 2 --duration 15
# 4. Light load latency.
bench light --sockets 100 --rate 20 --duration 10
# 5. Scale-out: the same find-max on two processes.
bench scale-out --sockets 200 --processes 2 --find-max --duration 5 --rates 20,40,80,120,160,200,240,280,320,360,400
# Servers compared at the same load.
for server in uvicorn uvicorn-legacy-ws daphne; do
  bench "server-$server" --server "$server" --sockets 200 --rate 20 --duration 10
done
