# The lightnode recipe (seed 000), run by the deploy in the new release directory, which holds
# build_chain.sh (from the archive) and, as file artifacts, bin/fisco-bcos, fisco-bcos-lightnode,
# config.genesis and nodes.json. NODE_CERT_DIR comes from the node's deploy settings ("env"):
# where this node keeps its certificate (node.key, node.crt) and its CA's (ca.crt).
set -euo pipefail
chmod +x build_chain.sh bin/fisco-bcos fisco-bcos-lightnode
bash build_chain.sh -p 30300,20200 -l 127.0.0.1:4 -e ./bin/fisco-bcos -L ./fisco-bcos-lightnode
[ -d nodes/lightnode ] || { echo "build_chain.sh did not create nodes/lightnode" >&2; exit 1; }
mv nodes/lightnode lightnode
rm -rf nodes
for f in node.key node.crt ca.crt; do
  [ -s "$NODE_CERT_DIR/$f" ] || { echo "the node's certificate file $NODE_CERT_DIR/$f is missing" >&2; exit 1; }
done
install -m 600 "$NODE_CERT_DIR/node.key" lightnode/conf/ssl.key
install -m 644 "$NODE_CERT_DIR/node.crt" lightnode/conf/ssl.crt
install -m 644 "$NODE_CERT_DIR/ca.crt" lightnode/conf/ca.crt
install -m 644 config.genesis lightnode/config.genesis
install -m 644 nodes.json lightnode/nodes.json
echo "lightnode prepared in $(pwd)/lightnode"
