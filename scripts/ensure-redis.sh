#!/usr/bin/env bash
# The tests start a private redis-server (or use REDIS_URL / Docker); make sure the
# binary exists, installing Debian's package when we may.
set -euo pipefail
if [ -n "${REDIS_URL:-}" ] || command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  exit 0
fi
echo "the tests need redis-server on PATH (or REDIS_URL, or a Docker engine)" >&2
exit 1
