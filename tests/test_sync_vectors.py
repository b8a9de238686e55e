"""protocols/vectors/sync.json: our encoder reproduces every byte of the folder-sync documents and
messages, and our verifiers accept them from the bytes alone (protocols/sync.md)."""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import Rejected, Trust
from p2pnode.envelope import Envelope, signing_bytes
from p2pnode.identity import KeyPair
from p2pnode.sync.documents import verify_chunk, verify_folder, verify_state
from p2pnode.sync.model import IndexChunk

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
sys.path.insert(0, str(VECTORS))
import make_sync_vectors  # noqa: E402

V = json.loads((VECTORS / "sync.json").read_text())
KEYS = {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in V["seeds"].items()}
NOW = timefmt.parse_ns(V["clock"])


def doc(name):
    return Envelope.from_bytes(bytes.fromhex(V[name]))


def test_file_matches_what_the_code_produces():
    assert make_sync_vectors.build() == V
    assert {n: str(k.peer_id) for n, k in KEYS.items()} == V["peer_ids"]


def test_folder_document_verifies_and_carries_every_field():
    trust = Trust(V["cluster_id"], KEYS["system"].public_key)
    folder = verify_folder(doc("sync_folder"), trust, NOW)
    c = folder.config
    assert folder.folder_id == "site" and c.source == KEYS["source"].peer_id and c.source_path == "/srv/site"
    assert [(n.node_id, n.target_path, n.strategy) for n in c.nodes] == [
        (KEYS["web1"].peer_id, "/srv/site", "mirror"), (KEYS["web2"].peer_id, "/srv/www/site", "overlay")]
    assert c.nodes[1].include == ("public/**",) and c.nodes[1].exclude == ("public/uploads/",)
    assert c.ignore_patterns == ("*.log", "node_modules/") and c.ignore_file == ".syncignore" and c.post_sync == ("systemctl", "reload", "nginx")
    assert (c.retry.max_attempts, c.retry.backoff_base_s, c.retry.backoff_cap_s, c.retry.jitter) == (3, 5.0, 300.0, 0.5)
    removed = verify_folder(doc("sync_folder_removed"), trust, NOW + 600 * timefmt.NS)
    assert removed.config is None and removed.issued_at_ns > folder.issued_at_ns
    with pytest.raises(Rejected) as info:  # another cluster's node refuses it
        verify_folder(doc("sync_folder"), Trust("other", KEYS["system"].public_key), NOW)
    assert info.value.code == "wrong_cluster"


def test_index_chunk_is_the_sources_and_its_hashes_are_the_contents():
    source = KEYS["source"].peer_id
    chunk = verify_chunk(bytes.fromhex(V["sync_index"]), "site", source)
    assert chunk == IndexChunk.from_bytes(bytes.fromhex(V["index_chunk_payload"]))
    assert (chunk.prev_seq, chunk.seq) == (0, 5) and [e.name for e in chunk.entries] == ["css", "empty.txt", "index.html", "latest", "old.txt"]
    by_name = {e.name: e for e in chunk.entries}
    html = bytes.fromhex(V["contents"]["index.html"])
    assert by_name["index.html"].blocks == hashlib.sha256(html).digest() and by_name["index.html"].block_size == 128 * 1024
    assert by_name["empty.txt"].blocks == b"" and by_name["latest"].target == "index.html" and by_name["old.txt"].deleted
    with pytest.raises(Rejected) as info:  # relayed, but a receiver takes chunks only from the folder's source
        verify_chunk(bytes.fromhex(V["sync_index"]), "site", KEYS["web1"].peer_id)
    assert info.value.code == "wrong_signer"


def test_states_are_signed_by_the_node_they_describe():
    src = verify_state(doc("sync_state_source"), NOW)
    assert (src.role, src.status, src.seq, src.have_seq, src.node) == ("source", "SOURCE", 5, 5, KEYS["source"].peer_id)
    rx = verify_state(doc("sync_state_receiver"), NOW)
    assert rx.status == "RUNNING" and rx.task.status == "RUNNING" and rx.task.files_total == 2 and rx.have_seq == 5 and rx.seq == 0
    degraded = verify_state(doc("sync_state_degraded"), NOW)
    assert degraded.status == "SYNC_DEGRADED" and degraded.task.attempt == 3 and "no space left" in degraded.task.last_error
    assert signing_bytes("sync-state", doc("sync_state_source").payload).startswith(b"\x15p2pnode-sync-state-v1\x0async-state")


@pytest.mark.parametrize("name", ["index_request_frame", "index_reply_frame", "have_request_frame", "have_reply_frame", "forbidden_reply_frame"])
def test_frames_decode(name):
    (message,) = framing.LengthPrefixedDecoder(8 << 20).feed(bytes.fromhex(V[name]))
    decoded = codec.decode(message)
    assert isinstance(decoded, dict)
    if name == "index_reply_frame":
        (data,) = decoded["chunks"]
        assert data == bytes.fromhex(V["sync_index"]) and decoded["more"] is False
