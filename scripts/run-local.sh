#!/usr/bin/env bash
# Install sandstream and run it locally: Redis (unless SANDSTREAM_REDIS_URL is set),
# the API and one worker, under honcho. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

export SANDSTREAM_HOST=${SANDSTREAM_HOST:-127.0.0.1}
export SANDSTREAM_PORT=${SANDSTREAM_PORT:-8000}
procfile=Procfile
if [ -z "${SANDSTREAM_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "sandstream needs Redis: install redis-server (Debian/Ubuntu: apt-get install redis-server," >&2
    echo "macOS: brew install redis) or point SANDSTREAM_REDIS_URL at a running Redis." >&2
    exit 1
  fi
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p .sandstream
  # Redis requires a password even here: a password made once for this machine,
  # kept in .sandstream/ (never on a command line, where `ps` would show it).
  if [ ! -s .sandstream/redis-password ]; then
    (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_hex(24))' > .sandstream/redis-password)
  fi
  (umask 077; cat > .sandstream/redis.conf <<CONF
port $port
bind 127.0.0.1
save ""
appendonly no
dir $PWD/.sandstream
requirepass $(cat .sandstream/redis-password)
CONF
)
  export SANDSTREAM_LOCAL_REDIS_CONF=$PWD/.sandstream/redis.conf
  export SANDSTREAM_REDIS_URL=redis://127.0.0.1:$port/0
  export SANDSTREAM_REDIS_PASSWORD="$(cat .sandstream/redis-password)"
  procfile=Procfile.redis
fi

# An API key for this machine, made once and kept in .sandstream/api-key.
if [ -z "${SANDSTREAM_API_KEYS:-}${SANDSTREAM_API_KEYS_FILE:-}" ] && [ "${SANDSTREAM_AUTH:-true}" != false ]; then
  mkdir -p .sandstream
  if [ ! -s .sandstream/api-key ]; then
    (umask 077; .venv/bin/python -c 'import secrets; print("sk-local-" + secrets.token_urlsafe(24))' > .sandstream/api-key)
  fi
  export SANDSTREAM_API_KEYS="local=$(cat .sandstream/api-key)"
  export SANDSTREAM_ADMIN_KEYS="$(cat .sandstream/api-key)"
fi
key=${SANDSTREAM_API_KEYS#*=}
key=${key%%,*}

# Tools run under bubblewrap; without it the worker refuses them unless allowed.
if ! command -v bwrap >/dev/null 2>&1 && [ -z "${SANDSTREAM_ALLOW_UNISOLATED:-}" ]; then
  echo "bubblewrap (bwrap) is not installed: agent commands will run WITHOUT isolation." >&2
  echo "Install it (apt-get install bubblewrap) for sandboxing; continuing for local use." >&2
  export SANDSTREAM_ALLOW_UNISOLATED=true
fi

base=http://$SANDSTREAM_HOST:$SANDSTREAM_PORT
cat <<MSG
sandstream: API on $base (Redis at ${SANDSTREAM_REDIS_URL##*@}, provider ${SANDSTREAM_PROVIDER:-demo})
API key: $key   (kept in .sandstream/api-key)
Try it in another terminal:

  K='Authorization: Bearer $key'
  SB=\$(curl -s -H "\$K" -X POST $base/api/v1/sandboxes | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
  S=\$(curl -s -H "\$K" -X POST $base/api/v1/sandboxes/\$SB/sessions -d '{"metadata":{}}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
  curl -s -N -H "\$K" $base/api/v1/sessions/\$S/stream &
  curl -s -H "\$K" -X POST $base/api/v1/sessions/\$S/messages -d '{"role":"user","content":[{"type":"text","text":"run: uname -a"}]}'

MSG
exec .venv/bin/honcho -f "$procfile" start
