"""protocols/vectors/control-plane.json: our encoder reproduces every byte, our verifier accepts them."""

import json
import sys
from pathlib import Path

import pytest

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import Rejected, Trust, verify_admin_proof, verify_revocation, verify_snapshot
from p2pnode.cluster.heartbeat import Heartbeat
from p2pnode.envelope import Envelope, signing_bytes
from p2pnode.identity import KeyPair

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
sys.path.insert(0, str(VECTORS))
import make_control_vectors  # noqa: E402

V = json.loads((VECTORS / "control-plane.json").read_text())


def test_file_matches_what_the_code_produces():
    assert make_control_vectors.build() == V


def test_documents_verify_from_the_bytes_alone():
    keys = {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in V["seeds"].items()}
    assert {n: str(k.peer_id) for n, k in keys.items()} == V["peer_ids"]
    now = timefmt.parse_ns(V["clock"])
    trust = Trust("demo", keys["system"].public_key)
    snap = verify_snapshot(Envelope.from_bytes(bytes.fromhex(V["snapshot"])), trust, now)
    assert [m.name for m in snap.members] == ["a", None]
    assert snap.issued_at == "2026-11-23T12:00:00.000000001Z"
    proof = verify_admin_proof(Envelope.from_bytes(bytes.fromhex(V["admin_proof"])), trust, cluster_id="demo",
                               admin=keys["admin"].peer_id, at_ns=now)
    assert proof.role == "admin"
    rev = verify_revocation(Envelope.from_bytes(bytes.fromhex(V["revocation"])), trust, now)
    assert rev.admins == (keys["admin"].peer_id,)
    hb = Heartbeat.from_dict(Envelope.from_bytes(bytes.fromhex(V["heartbeat"])).verify())
    assert hb.state == "healthy" and hb.peer_id == keys["node_a"].peer_id
    status = Envelope.from_bytes(bytes.fromhex(V["status"]))
    assert status.verify()["state"] == "degraded" and status.signer_id == keys["node_b"].peer_id


def test_vector_snapshot_once_its_proof_has_expired():
    """The proof runs to clock + 24 h: a node receiving the snapshot later refuses it, whatever
    the snapshot's own date; the node that stored it while the proof was valid keeps it."""
    system = KeyPair.from_seed(bytes.fromhex(V["seeds"]["system"]))
    trust = Trust("demo", system.public_key)
    env = Envelope.from_bytes(bytes.fromhex(V["snapshot"]))
    later = timefmt.parse_ns(V["clock"]) + 25 * 3600 * timefmt.NS
    with pytest.raises(Rejected) as info:
        verify_snapshot(env, trust, later)
    assert info.value.code == "proof_expired"
    assert verify_snapshot(env, trust, later, stored=True).issued_at == "2026-11-23T12:00:00.000000001Z"


def test_signature_input_layout():
    env = Envelope.from_bytes(bytes.fromhex(V["heartbeat"]))
    data = signing_bytes("heartbeat", env.payload)
    assert data.startswith(b"\x14p2pnode-heartbeat-v1\x09heartbeat")
    assert data.endswith(env.payload)


@pytest.mark.parametrize("name", ["push_request_frame", "push_verdict_frame", "pull_request_frame", "pull_reply_frame",
                                  "status_request_frame"])
def test_frames_decode(name):
    (message,) = framing.LengthPrefixedDecoder(4 << 20).feed(bytes.fromhex(V[name]))
    assert isinstance(codec.decode(message), dict)
