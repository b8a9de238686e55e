#!/usr/bin/env bash
# Runs the whole test suite. On a fresh machine it first installs what the tests need:
# Node.js (the js-libp2p interop peer), dnsmasq (a real DNS server for bootstrap tests),
# iproute2 (hosts in network namespaces) and systemd-analyze, via apt-get when run as root;
# a virtualenv in .venv with p2pnode and its test dependencies, and tests/interop's npm packages.
# Extra arguments go to pytest (e.g. ./test.sh -k yamux).
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)  # DNS TXT bootstrap tests
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)                                        # network-namespace hosts
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)                            # verifying the unit
{ command -v podman && command -v runc; } >/dev/null 2>&1 || need_apt+=(podman runc)         # deploy.docker tests
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need_apt+=(busybox-static) # their image's rootfs
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${need_apt[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "test.sh: please install: ${need_apt[*]} (or run as root to have them installed)" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

if [ ! -d tests/interop/node_modules ] || [ tests/interop/package-lock.json -nt tests/interop/node_modules ]; then
  npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error
fi

# Lint and type checks fail the run before any test (settings in pyproject.toml); P2PNODE_SKIP_CHECKS=1 skips them
# when you only want pytest (e.g. ./test.sh -k yamux while editing).
if [ "${P2PNODE_SKIP_CHECKS:-0}" != 1 ]; then
  echo "test.sh: ruff" >&2
  .venv/bin/ruff check p2pnode tools tests benchmarks
  echo "test.sh: mypy" >&2
  .venv/bin/mypy
fi

# hypothesis: no deadline or too_slow health check on a busy machine (tests/conftest.py); same examples
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
exec .venv/bin/python -m pytest "$@"
