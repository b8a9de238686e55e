"""Writes sync.json: the signed documents and messages of folder sync (protocols/sync.md), byte for byte.

Ed25519 signatures are deterministic, CBOR is encoded canonically and every key, time and file
is fixed, so the bytes are reproducible. Run from the repository root:
    python protocols/vectors/make_sync_vectors.py
"""

import hashlib
import json
from pathlib import Path

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import AdminProof
from p2pnode.identity import KeyPair
from p2pnode.sync.blocks import block_size_for
from p2pnode.sync.documents import FolderDoc, SyncState, TaskInfo, sign_chunk
from p2pnode.sync.model import DIR, FILE, SYMLINK, FileEntry, FolderConfig, IndexChunk, NodeTarget, RetryPolicy

SEEDS = {"system": "11" * 32, "admin": "22" * 32, "source": "55" * 32, "web1": "66" * 32, "web2": "77" * 32}
T0 = timefmt.parse_ns("2026-11-25T08:00:00.000000001Z")
S = timefmt.NS
INDEX_ID = 0x1234_5678_9ABC
CONTENTS = {"index.html": b"<h1>hello</h1>\n", "empty.txt": b""}


def keys() -> dict[str, KeyPair]:
    return {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in SEEDS.items()}


def folder_config(k: dict[str, KeyPair]) -> FolderConfig:
    return FolderConfig(
        id="site", source=k["source"].peer_id, source_path="/srv/site", issued_at_ns=T0,
        nodes=(NodeTarget(k["web1"].peer_id, "/srv/site"),
               NodeTarget(k["web2"].peer_id, "/srv/www/site", "overlay", include=("public/**",), exclude=("public/uploads/",))),
        max_parallel_nodes=1, ignore_defaults=True, ignore_patterns=("*.log", "node_modules/"), ignore_file=".syncignore",
        ignore_permissions=False, retry=RetryPolicy(max_attempts=3, backoff_base_s=5.0, backoff_cap_s=300.0, jitter=0.5),
        post_sync=("systemctl", "reload", "nginx"), rescan_interval_s=3600,
    )


def entries() -> tuple[FileEntry, ...]:
    html = CONTENTS["index.html"]
    return (
        FileEntry("css", DIR, seq=1, mode=0o755, mtime_ns=T0 - 60 * S, uid=1000, gid=1000),
        FileEntry("empty.txt", FILE, seq=2, size=0, mode=0o644, mtime_ns=T0 - 50 * S, uid=1000, gid=1000, block_size=block_size_for(0)),
        FileEntry("index.html", FILE, seq=3, size=len(html), mode=0o644, mtime_ns=T0 - 40 * S, uid=1000, gid=1000,
                  block_size=block_size_for(len(html)), blocks=hashlib.sha256(html).digest()),
        FileEntry("latest", SYMLINK, seq=4, mode=0o777, mtime_ns=T0 - 30 * S, uid=1000, gid=1000, target="index.html"),
        FileEntry("old.txt", FILE, seq=5, mtime_ns=T0 - 20 * S, deleted=True),
    )


def build() -> dict:
    k = keys()
    proof = AdminProof("admin", "demo", k["admin"].peer_id, T0 - 3600 * S, T0 + 86400 * S, T0 - 60 * S).sign(k["system"])
    config = folder_config(k)
    folder = FolderDoc("site", T0, config).sign(k["admin"], proof, "demo")
    removal = FolderDoc("site", T0 + 600 * S, None).sign(k["admin"], proof, "demo")
    chunk = IndexChunk("site", INDEX_ID, 0, 5, entries())
    signed_chunk = sign_chunk(chunk, k["source"])
    source_state = SyncState("site", k["source"].peer_id, T0 + 1 * S, "source", "SOURCE", INDEX_ID, 5, 5)
    task = TaskInfo(f"site@{k['web1'].peer_id.short()}:5", INDEX_ID, 5, "RUNNING", attempt=1, started_at_ns=T0 + 2 * S,
                    files_done=1, files_total=2, bytes_done=0, bytes_total=len(CONTENTS["index.html"]), rate=0.0,
                    log=("08:00:02 attempt 1: applying version 5", "08:00:02 plan: 2 files (15 B), 1 dirs, 1 symlinks, 0 deletes"))
    receiver_state = SyncState("site", k["web1"].peer_id, T0 + 3 * S, "receiver", "RUNNING", INDEX_ID, 0, 5, "", task)
    failed = TaskInfo(f"site@{k['web2'].peer_id.short()}:5", INDEX_ID, 5, "FAILED", attempt=3, started_at_ns=T0 + 2 * S,
                      finished_at_ns=T0 + 4 * S, last_error="no space left on device (needs 15 B more)",
                      log=("08:00:04 failed: no space left on device (needs 15 B more)",))
    degraded_state = SyncState("site", k["web2"].peer_id, T0 + 4 * S, "receiver", "SYNC_DEGRADED", INDEX_ID, 0, 5, "", failed)
    index_request = {"op": "index", "folder": "site", "index_id": INDEX_ID, "after": 0}
    index_reply = {"index_id": INDEX_ID, "chunks": [signed_chunk.to_bytes()], "more": False}
    have_request = {"op": "have", "folder": "site", "hashes": [hashlib.sha256(CONTENTS["index.html"]).digest()]}
    return {
        "description": "p2pnode folder-sync vectors (protocols/sync.md): hex of canonical CBOR; *_frame values include the "
                       "uvarint length prefix; signed documents are envelopes (protocols/envelope.md)",
        "seeds": SEEDS,
        "peer_ids": {name: str(key.peer_id) for name, key in k.items()},
        "clock": timefmt.format_ns(T0 + 10 * S),
        "cluster_id": "demo",
        "contents": {name: data.hex() for name, data in CONTENTS.items()},
        "admin_proof": proof.to_bytes().hex(),
        "sync_folder": folder.to_bytes().hex(),
        "sync_folder_removed": removal.to_bytes().hex(),
        "index_chunk_payload": chunk.to_bytes().hex(),
        "sync_index": signed_chunk.to_bytes().hex(),
        "sync_state_source": source_state.sign(k["source"]).to_bytes().hex(),
        "sync_state_receiver": receiver_state.sign(k["web1"]).to_bytes().hex(),
        "sync_state_degraded": degraded_state.sign(k["web2"]).to_bytes().hex(),
        "index_request_frame": framing.encode(codec.encode(index_request)).hex(),
        "index_reply_frame": framing.encode(codec.encode(index_reply)).hex(),
        "have_request_frame": framing.encode(codec.encode(have_request)).hex(),
        "have_reply_frame": framing.encode(codec.encode({})).hex(),
        "forbidden_reply_frame": framing.encode(codec.encode({"error": "forbidden"})).hex(),
    }


def main() -> None:
    out = Path(__file__).with_name("sync.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
