#!/bin/bash
# A stand-in for FISCO BCOS's build_chain.sh, taking the options the lightnode recipe uses:
#   bash build_chain.sh -p 30300,20200 -l 127.0.0.1:4 -e ./bin/fisco-bcos -L ./fisco-bcos-lightnode
# It lays out nodes/<ip>/node<i> for the -l layout and nodes/lightnode/{conf,start.sh,stop.sh,...}
# the way the real script does, with placeholder certificates the recipe then overlays.
set -euo pipefail
ports="" layout="" bin="" light=""
while getopts "p:l:e:L:" opt; do
  case $opt in
    p) ports=$OPTARG ;;
    l) layout=$OPTARG ;;
    e) bin=$OPTARG ;;
    L) light=$OPTARG ;;
    *) echo "usage: build_chain.sh -p P2P,RPC -l IP:COUNT -e FISCO_BIN -L LIGHTNODE_BIN" >&2; exit 2 ;;
  esac
done
[ -n "$ports" ] && [ -n "$layout" ] || { echo "build_chain.sh: -p and -l are required" >&2; exit 2; }
[ -x "$bin" ] || { echo "build_chain.sh: -e $bin is not an executable file" >&2; exit 1; }
[ -x "$light" ] || { echo "build_chain.sh: -L $light is not an executable file" >&2; exit 1; }
"$bin" -v
p2p=${ports%,*} rpc=${ports#*,} ip=${layout%:*} count=${layout#*:}
[ -d nodes ] && { echo "build_chain.sh: nodes/ exists already" >&2; exit 1; }
mkdir -p nodes/ca
for i in $(seq 0 $((count - 1))); do
  mkdir -p "nodes/$ip/node$i/conf"
  printf '[p2p]\nlisten_port=%d\n[rpc]\nlisten_port=%d\n' $((p2p + i)) $((rpc + i)) > "nodes/$ip/node$i/config.ini"
done
ln="nodes/lightnode"
mkdir -p "$ln/conf"
cp "$light" "$ln/fisco-bcos-lightnode"
printf '[p2p]\nlisten_ip=0.0.0.0\nlisten_port=%d\n[rpc]\nlisten_port=%d\n' $((p2p + count)) $((rpc + count)) > "$ln/config.ini"
for f in ssl.key ssl.crt ca.crt; do echo "placeholder from build_chain.sh" > "$ln/conf/$f"; done
echo "placeholder genesis" > "$ln/config.genesis"
echo '{"nodes": []}' > "$ln/nodes.json"
cat > "$ln/start.sh" <<'START'
#!/bin/bash
cd "$(dirname "$0")"
alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1); [ -n "$s" ] && [ "$s" != Z ]; }
if [ -f lightnode.pid ] && alive "$(cat lightnode.pid)"; then echo "lightnode is already running"; exit 0; fi
nohup ./fisco-bcos-lightnode -c config.ini -g config.genesis > lightnode.log 2>&1 &
echo $! > lightnode.pid
echo "lightnode started (pid $!)"
START
cat > "$ln/stop.sh" <<'STOP'
#!/bin/bash
cd "$(dirname "$0")"
alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1); [ -n "$s" ] && [ "$s" != Z ]; }
[ -f lightnode.pid ] || { echo "lightnode is not running"; exit 0; }
pid=$(cat lightnode.pid)
kill "$pid" 2>/dev/null || true
for _ in $(seq 100); do alive "$pid" || { rm -f lightnode.pid; echo "lightnode stopped"; exit 0; }; sleep 0.1; done
kill -9 "$pid"; rm -f lightnode.pid; echo "lightnode killed"
STOP
chmod +x "$ln/start.sh" "$ln/stop.sh" "$ln/fisco-bcos-lightnode"
echo "=============================================================="
echo "All completed. Files in nodes"
