#!/usr/bin/env bash
# What the test suite needs from the system: redis-server (unless REDIS_URL is set),
# what confines sandboxes (bubblewrap; prlimit, setpriv, nsenter; slirp4netns and
# iproute2 for private networks; libseccomp), mkfs.btrfs for the disk-quota tests,
# and the tools that check the deployment files: nginx (the proxy config, run in
# front of two APIs), promtool (the alert rules) and systemd-analyze (the units);
# Chromium for the browser tests (Playwright drives Debian's build and never
# downloads its own). Installs Debian's packages when we may; otherwise says what
# is missing.
set -euo pipefail
missing=()
if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  missing+=(redis-server)
fi
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v prlimit >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v slirp4netns >/dev/null 2>&1 || missing+=(slirp4netns)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v mkfs.btrfs >/dev/null 2>&1 || missing+=(btrfs-progs)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  exit 0
fi
echo "the tests need: ${missing[*]} (install them, or set REDIS_URL for Redis)" >&2
exit 1
