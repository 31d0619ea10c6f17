# shellcheck shell=bash
# Shared setup for bin/serve and bin/test; sourced, not run.
# The caller has `set -euo pipefail` and has cd'd to the repo root.

die() { echo "ERROR: $*" >&2; exit 1; }

# Python 3.11+ is required by the code (and by the pinned packages).
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

# Create .venv if missing, install requirements.txt when it changed since the
# last install (its hash is stamped in .venv), and put the venv first on PATH.
setup_venv() {
  local py="${PYTHON:-python3}" stamp=".venv/.requirements.sha256" want
  if [ ! -x .venv/bin/python ]; then
    command -v "$py" >/dev/null || die "$py not found: install Python 3.11 or newer."
    py_ok "$py" || die "Python 3.11+ is required, but $py is $("$py" --version 2>&1)."
    echo "Creating .venv with $("$py" --version 2>&1) ..."
    "$py" -m venv .venv
  fi
  py_ok .venv/bin/python || die ".venv has $(.venv/bin/python --version 2>&1); Python 3.11+ is required. Remove .venv and rerun."
  want="$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("requirements.txt", "rb").read()).hexdigest())')"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "Installing requirements.txt into .venv ..."
    .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$want" >"$stamp"
  fi
  export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
}

# True if the Redis at REDIS_URL answers PING (redis-cli may not be installed).
redis_ping() {
  python -c 'import os, redis
redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                     socket_connect_timeout=1, socket_timeout=1).ping()' >/dev/null 2>&1
}

# Use the Redis at REDIS_URL; if it is down, start a local redis-server (for the
# default REDIS_URL) and wait for it. Returns 1 if no Redis can be had.
ensure_redis() {
  redis_ping && return 0
  command -v redis-server >/dev/null || return 1
  echo "Redis is not answering; starting a local redis-server (log: var/redis.log) ..."
  mkdir -p var
  redis-server --daemonize yes --port 6379 --save "" --appendonly no \
    --dir "$PWD/var" --logfile "$PWD/var/redis.log" --pidfile "$PWD/var/redis.pid" >/dev/null || return 1
  for _ in $(seq 1 20); do
    redis_ping && return 0
    sleep 0.5
  done
  echo "redis-server was started but does not answer at ${REDIS_URL:-redis://127.0.0.1:6379/0}; see var/redis.log" >&2
  return 1
}

# The browser tests (tests/e2e) drive Debian's Chromium with Playwright and run
# axe-core (an npm package, in node_modules/) in the pages. Install either when
# it is missing and this machine allows (root with apt-get; npm), else stop
# and say what to install: the browser tests are part of every run.
E2E_CHROMIUM="${E2E_CHROMIUM:-/usr/bin/chromium}"
AXE_CORE="axe-core@4.14.1"  # keep in step with tests/e2e/test_pages.py's message
ensure_e2e_tools() {
  if [ ! -x "$E2E_CHROMIUM" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "Installing Debian's chromium for the browser tests ..."
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || die "apt-get could not install chromium (needed by tests/e2e)."
      [ -x "$E2E_CHROMIUM" ] || die "chromium is installed but $E2E_CHROMIUM is not there; set E2E_CHROMIUM to its binary."
    else
      die "the browser tests (tests/e2e) need Chromium at $E2E_CHROMIUM: install it (sudo apt-get install chromium), or set E2E_CHROMIUM to a Chromium binary."
    fi
  fi
  if [ ! -f node_modules/axe-core/axe.min.js ]; then
    command -v npm >/dev/null \
      || die "the accessibility tests need $AXE_CORE from npm, and npm is not installed: install Node.js and npm (sudo apt-get install npm), then rerun."
    echo "Installing $AXE_CORE into node_modules/ for the accessibility tests ..."
    npm install --prefix "$PWD" --no-save --no-audit --no-fund --loglevel=error "$AXE_CORE" >/dev/null \
      || die "npm could not install $AXE_CORE (needed by tests/e2e)."
  fi
  export E2E_CHROMIUM
}
