#!/usr/bin/env bash
# Install a p2pnode node from this checkout. Run with --help for the flows and options.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="" DATA_DIR="" SERVICE_USER="p2pnode" SYSTEMD="auto" MODE="standalone" START=0
CLUSTER="" SYSTEM_PUBKEY="" ADMIN_DIR="" DOMAIN="" UNINSTALL=0 PURGE=0 DATA_DIR_GIVEN=""
BOOTSTRAP=() LISTEN=() DNS=() HEARTBEAT=""

usage() {
  cat <<'USAGE'
install.sh — install a p2pnode node from this checkout into its own virtualenv.

Flows:
  (default)        a standalone node: key and default config, no cluster yet
  --new-system     start a new cluster here: create the system key, an admin key with its proof,
                   this node's key and config, and a first snapshot with this node in it; print the
                   _dnsaddr TXT records to publish and the admin bundle
  --join           join an existing cluster: needs --system-pubkey, --cluster and --bootstrap

Options:
  --prefix DIR           install here (default /opt/p2pnode as root, else ~/.local/share/p2pnode)
  --data-dir DIR         node data (default /var/lib/p2pnode with the default root prefix,
                         else PREFIX/data)
  --user NAME            system user the service runs as (root installs; default p2pnode)
  --no-systemd           do not install the systemd unit (the default when systemd is not running)
  --cluster ID           cluster ID (--new-system, --join)
  --system-pubkey KEY    the cluster's system key, 12D3KooW… (--join)
  --bootstrap X          a DNS domain with _dnsaddr records, or a multiaddr (repeatable; --join)
  --domain D             the bootstrap domain to print TXT records for (--new-system)
  --admin-dir DIR        where --new-system writes the admin material (default PREFIX/admin);
                         move it off this server afterwards. Set P2PNODE_ADMIN_PASSPHRASE to
                         encrypt the keys.
  --listen MULTIADDR     listen address (repeatable; default TCP and WebSocket on 4100)
  --dns-server H:P       DNS server for bootstrap lookups (repeatable)
  --heartbeat SECONDS    heartbeat interval (default 30)
  --start                after installing, run the node in the foreground (quick start)
  --uninstall            remove what install.sh installed at --prefix (give the one you installed
                         with; refuses if nothing is there); keeps the data dir unless --purge
  --purge                with --uninstall: also delete the data dir (keys included)
  -h, --help             this text

Re-running is safe: keys are never overwritten; config fields given again are updated.
USAGE
}

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --data-dir) DATA_DIR="${2:?--data-dir needs a directory}"; DATA_DIR_GIVEN=1; shift 2 ;;
    --user) SERVICE_USER="${2:?--user needs a name}"; shift 2 ;;
    --no-systemd) SYSTEMD="no"; shift ;;
    --new-system) MODE="new-system"; shift ;;
    --join) MODE="join"; shift ;;
    --cluster) CLUSTER="${2:?--cluster needs an ID}"; shift 2 ;;
    --system-pubkey) SYSTEM_PUBKEY="${2:?--system-pubkey needs a key}"; shift 2 ;;
    --bootstrap) BOOTSTRAP+=("${2:?--bootstrap needs a domain or multiaddr}"); shift 2 ;;
    --domain) DOMAIN="${2:?--domain needs a domain}"; shift 2 ;;
    --admin-dir) ADMIN_DIR="${2:?--admin-dir needs a directory}"; shift 2 ;;
    --listen) LISTEN+=("${2:?--listen needs a multiaddr}"); shift 2 ;;
    --dns-server) DNS+=("${2:?--dns-server needs host:port}"); shift 2 ;;
    --heartbeat) HEARTBEAT="${2:?--heartbeat needs seconds}"; shift 2 ;;
    --start) START=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

IS_ROOT=0; [ "$(id -u)" -eq 0 ] && IS_ROOT=1
if [ -z "$PREFIX" ]; then
  if [ $IS_ROOT -eq 1 ]; then PREFIX=/opt/p2pnode; else PREFIX="$HOME/.local/share/p2pnode"; fi
fi
if [ -z "$DATA_DIR" ]; then
  # The system install keeps data in /var/lib; any other prefix is self-contained.
  if [ "$PREFIX" = /opt/p2pnode ]; then DATA_DIR=/var/lib/p2pnode; else DATA_DIR="$PREFIX/data"; fi
fi
[ -n "$ADMIN_DIR" ] || ADMIN_DIR="$PREFIX/admin"
if [ "$SYSTEMD" = "auto" ]; then
  if [ $IS_ROOT -eq 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then SYSTEMD=yes; else SYSTEMD=no; fi
fi
UNIT=/etc/systemd/system/p2pnode.service
VENV="$PREFIX/venv"

# --- uninstall --------------------------------------------------------------------------------------
if [ $UNINSTALL -eq 1 ]; then
  if [ ! -f "$PREFIX/install.json" ] && [ ! -e "$VENV" ]; then
    die "nothing is installed at $PREFIX (no install.json, no venv); give the --prefix you installed with"
  fi
  if [ -z "$DATA_DIR_GIVEN" ] && [ -f "$PREFIX/install.json" ]; then
    # the data dir this install used (it may have been given with --data-dir)
    DATA_DIR="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data_dir"])' "$PREFIX/install.json" 2>/dev/null || echo "$DATA_DIR")"
  fi
  if [ "$SYSTEMD" = yes ] && [ -f "$UNIT" ] && grep -qF "$VENV/bin/p2pnode" "$UNIT"; then  # only this install's unit
    systemctl disable --now p2pnode.service || true
    rm -f "$UNIT"; systemctl daemon-reload
    say "removed $UNIT"
  fi
  rm -rf "$VENV" "$PREFIX/install.json"
  say "removed $VENV"
  if [ $PURGE -eq 1 ]; then
    rm -rf "$DATA_DIR"; say "purged $DATA_DIR"
  else
    say "kept $DATA_DIR (keys, config, database); --purge deletes it"
  fi
  rmdir "$PREFIX" 2>/dev/null || true
  exit 0
fi

# --- checks -----------------------------------------------------------------------------------------
case "$MODE" in
  join)
    [ -n "$SYSTEM_PUBKEY" ] || die "--join needs --system-pubkey (printed by the cluster's init-system)"
    [ -n "$CLUSTER" ] || die "--join needs --cluster"
    [ ${#BOOTSTRAP[@]} -gt 0 ] || die "--join needs at least one --bootstrap domain or multiaddr" ;;
  new-system)
    [ -n "$CLUSTER" ] || die "--new-system needs --cluster (a name for the new cluster)" ;;
esac
command -v python3 >/dev/null || die "python3 (≥ 3.11) is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 ≥ 3.11 is required (found $(python3 --version))"

# --- package ----------------------------------------------------------------------------------------
mkdir -p "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
say "installing p2pnode from $SRC"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SRC"

# --- service user and data dir ------------------------------------------------------------------------
if [ $IS_ROOT -eq 1 ] && [ "$SYSTEMD" = yes ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  say "created system user $SERVICE_USER"
fi
mkdir -p "$DATA_DIR"; chmod 700 "$DATA_DIR"

# --- config and keys (existing keys are kept) --------------------------------------------------------------
INIT=(--data-dir "$DATA_DIR" --json)
for a in "${LISTEN[@]+"${LISTEN[@]}"}"; do INIT+=(--listen "$a"); done
for b in "${BOOTSTRAP[@]+"${BOOTSTRAP[@]}"}"; do INIT+=(--bootstrap "$b"); done
for d in "${DNS[@]+"${DNS[@]}"}"; do INIT+=(--dns-server "$d"); done
[ -n "$CLUSTER" ] && INIT+=(--cluster-id "$CLUSTER")
[ -n "$HEARTBEAT" ] && INIT+=(--heartbeat-interval "$HEARTBEAT")

ADMIN="$VENV/bin/p2pnode-admin"
if [ "$MODE" = new-system ]; then
  mkdir -p "$ADMIN_DIR"; chmod 700 "$ADMIN_DIR"
  if [ ! -f "$ADMIN_DIR/system.key" ]; then
    "$ADMIN" init-system --dir "$ADMIN_DIR" --json > "$ADMIN_DIR/system.json"
  fi
  SYSTEM_PUBKEY="$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["system_pubkey"])' "$ADMIN_DIR/system.json")"
  if [ ! -f "$ADMIN_DIR/admin.key" ]; then
    "$ADMIN" new-admin --system-key "$ADMIN_DIR/system.key" --cluster "$CLUSTER" --dir "$ADMIN_DIR" --json > "$ADMIN_DIR/admin.json"
  fi
fi
[ -n "$SYSTEM_PUBKEY" ] && INIT+=(--system-pubkey "$SYSTEM_PUBKEY")
NODE_JSON="$("$VENV/bin/p2pnode" init "${INIT[@]}")"
PEER_ID="$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["peer_id"])' "$NODE_JSON")"
echo "$NODE_JSON" > "$PREFIX/install.json"

# Addresses from the listen addresses the config holds (the defaults or --listen): LOCAL_ADDR reaches
# this node from here (a wildcard becomes loopback; TCP preferred), RECORD_ADDRS are for the _dnsaddr
# TXT records (a wildcard becomes <public-ip>), MEMBER_ADDRS the concrete ones for the first snapshot.
LOCAL_ADDR="" RECORD_ADDRS=() MEMBER_ADDRS=""
while read -r kind addr; do
  case "$kind" in
    local) LOCAL_ADDR="$addr" ;;
    record) RECORD_ADDRS+=("$addr") ;;
    member) MEMBER_ADDRS="${MEMBER_ADDRS:+$MEMBER_ADDRS,}$addr" ;;
  esac
done < <("$VENV/bin/python" - "$NODE_JSON" <<'PY'
import ipaddress, json, sys
from p2pnode.multiaddr import Multiaddr
info = json.loads(sys.argv[1])
local = []
for text in info["listen"]:
    (proto, ip), *rest = Multiaddr.parse(text).components
    tail = "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in rest) + "/p2p/" + info["peer_id"]
    wildcard = ipaddress.ip_address(ip).is_unspecified
    local.append((("ws", None) in rest, f"/{proto}/{({'ip4': '127.0.0.1', 'ip6': '::1'}[proto]) if wildcard else ip}{tail}"))
    print("record", f"/{proto}/{'<public-ip>' if proto == 'ip4' else '<public-ipv6>'}{tail}" if wildcard else f"/{proto}/{ip}{tail}")
    if not wildcard and not ipaddress.ip_address(ip).is_loopback:
        print("member", text)
if local:
    print("local", min(local, key=lambda x: x[0])[1])  # the first TCP address, else the first
PY
)
[ -n "$LOCAL_ADDR" ] || die "the config has no listen address"

if [ $IS_ROOT -eq 1 ] && [ "$SYSTEMD" = yes ]; then
  chown -R "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR"
fi

if [ "$MODE" = new-system ]; then
  # the first snapshot: this node alone, so it is healthy as soon as it starts
  FIRST="$ADMIN_DIR/first.snapshot"
  PUBLISH_FIRST="$ADMIN publish $FIRST --to $LOCAL_ADDR"
  if [ ! -f "$FIRST" ]; then
    "$ADMIN" snapshot --admin-key "$ADMIN_DIR/admin.key" --proof "$ADMIN_DIR/admin.proof" --state-dir "$ADMIN_DIR/state" \
      --add "$PEER_ID;name=$(hostname -s 2>/dev/null || echo node1)${MEMBER_ADDRS:+;addrs=$MEMBER_ADDRS}" --out "$FIRST" --json > /dev/null
  fi
  BUNDLE="$("$ADMIN" bundle export --admin-key "$ADMIN_DIR/admin.key" --proof "$ADMIN_DIR/admin.proof" \
      --system-pubkey "$SYSTEM_PUBKEY" ${DOMAIN:+--bootstrap "$DOMAIN"})"
  cat <<INFO

== new cluster "$CLUSTER" ==
system_pubkey  $SYSTEM_PUBKEY
this node      $PEER_ID
admin material $ADMIN_DIR   (move it off this server; keep system.key offline)

DNS: publish these TXT records (replace <public-ip> with this server's address):
$(for a in "${RECORD_ADDRS[@]}"; do echo "_dnsaddr.${DOMAIN:-cluster.example.com}. 300 IN TXT \"dnsaddr=$a\""; done)

Join another server:
  ./install.sh --join --cluster $CLUSTER --system-pubkey $SYSTEM_PUBKEY --bootstrap ${DOMAIN:-cluster.example.com}

Admin bundle (contains the admin private key):
$BUNDLE

First snapshot (this node only): $FIRST
INFO
fi

# --- service -------------------------------------------------------------------------------------------
if [ "$SYSTEMD" = yes ]; then
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@DATA_DIR@|$DATA_DIR|g" -e "s|@USER@|$SERVICE_USER|g" "$SRC/systemd/p2pnode.service" > "$UNIT.tmp"
  mv "$UNIT.tmp" "$UNIT"
  systemctl daemon-reload
  systemctl enable --now p2pnode.service
  say "p2pnode.service enabled and started; logs: journalctl -u p2pnode -f; status: $VENV/bin/p2pnode status --data-dir $DATA_DIR"
  if [ "$MODE" = new-system ]; then
    for _ in $(seq 1 30); do [ -S "$DATA_DIR/control.sock" ] && break; sleep 1; done
    "$ADMIN" publish "$FIRST" --to "$LOCAL_ADDR" --timeout 30 || \
      say "could not publish the first snapshot yet; once the node runs: $PUBLISH_FIRST"
  fi
else
  say "installed: $VENV/bin/p2pnode run --data-dir $DATA_DIR   (peer $PEER_ID)"
  if [ "$MODE" = new-system ]; then
    if [ $START -eq 1 ]; then STEP="It starts now, in the foreground (--start)."; else STEP="Start it:
  $VENV/bin/p2pnode run --data-dir $DATA_DIR"; fi
    cat <<MANUAL

Without systemd nothing starts the node or publishes the first snapshot: do both by hand.
$STEP
Then, from another shell, publish the first snapshot (this node becomes healthy):
  $PUBLISH_FIRST
MANUAL
  fi
fi

if [ $START -eq 1 ]; then
  exec "$VENV/bin/p2pnode" run --data-dir "$DATA_DIR"
fi
