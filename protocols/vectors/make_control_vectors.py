"""Writes control-plane.json: signed documents and messages of the /p2pnode protocols, byte for byte.

Ed25519 signatures are deterministic, CBOR is encoded canonically and every key and time is
fixed, so the bytes are reproducible. Run from the repository root:
    python protocols/vectors/make_control_vectors.py
"""

import json
from pathlib import Path

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import AdminProof, Member, Revocation, Snapshot
from p2pnode.cluster.heartbeat import Heartbeat
from p2pnode.envelope import Envelope
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr

SEEDS = {"system": "11" * 32, "admin": "22" * 32, "node_a": "33" * 32, "node_b": "44" * 32}
T0 = timefmt.parse_ns("2026-11-23T12:00:00.000000001Z")


def keys() -> dict[str, KeyPair]:
    return {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in SEEDS.items()}


def build() -> dict:
    k = keys()
    proof = AdminProof("admin", "demo", k["admin"].peer_id, T0 - 3600 * timefmt.NS, T0 + 86400 * timefmt.NS, T0 - 60 * timefmt.NS).sign(k["system"])
    members = (
        Member(k["node_a"].peer_id, "a", (Multiaddr.parse("/ip4/192.0.2.1/tcp/4100"),), ("web",)),
        Member(k["node_b"].peer_id, None, (Multiaddr.parse("/dns4/b.example.com/tcp/4101/ws"),), ()),
    )
    snapshot = Snapshot("demo", T0, k["admin"].peer_id, members, proof).sign(k["admin"])
    revocation = Revocation("demo", T0 + 1, (k["admin"].peer_id,), "key lost").sign(k["system"])
    heartbeat = Heartbeat(k["node_a"].peer_id, "demo", "healthy", timefmt.format_ns(T0), T0 + 5, T0 + 5).sign(k["node_a"])
    status = Envelope.seal("status", {"peer_id": str(k["node_b"].peer_id), "state": "degraded", "member_count": 2, "online_count": 1}, k["node_b"])
    push_request = codec.encode({"doc": snapshot.to_dict(), "forwarded_to": [str(k["node_a"].peer_id)]})
    pull_request = {"summaries": {"membership-snapshot": "", "revocation": ""},
                    "have": {"membership-snapshot": [], "revocation": []}}
    return {
        "description": "p2pnode control-plane vectors: hex of canonical CBOR; *_frame values include the uvarint length prefix",
        "seeds": SEEDS,
        "peer_ids": {name: str(key.peer_id) for name, key in k.items()},
        "clock": timefmt.format_ns(T0 + 10),
        "admin_proof": proof.to_bytes().hex(),
        "snapshot": snapshot.to_bytes().hex(),
        "revocation": revocation.to_bytes().hex(),
        "heartbeat": heartbeat.to_bytes().hex(),
        "status": status.to_bytes().hex(),
        "push_request_frame": framing.encode(push_request).hex(),
        "push_verdict_frame": framing.encode(codec.encode({"result": "accepted", "code": "", "reason": ""})).hex(),
        "pull_request_frame": framing.encode(codec.encode(pull_request)).hex(),
        "pull_reply_frame": framing.encode(codec.encode({"docs": [revocation.to_dict()], "need_have": [], "more": False})).hex(),
        "status_request_frame": framing.encode(codec.encode({"members": True})).hex(),
    }


def main() -> None:
    out = Path(__file__).with_name("control-plane.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
