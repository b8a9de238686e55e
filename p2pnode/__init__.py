"""p2pnode: a peer-to-peer node runtime on trio that speaks libp2p on the wire."""

__version__ = "0.1.0"
AGENT_VERSION = f"p2pnode/{__version__}"
