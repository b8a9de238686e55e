"""Hostile documents and messages, built with the project's own envelope and cbor2.

- `shared_ref_snapshot`: a validly self-signed membership snapshot whose member list is one member
  (64 addresses, 64 labels) referenced 10,000 times through CBOR value sharing (tags 28/29):
  ~36 KB on the wire, 10,000 × 64 multiaddrs to parse for whoever builds it before checking trust.
- `cbor_bomb_push`: a document-push request of just under 4 MiB whose `doc` is an array of
  ~4 million empty arrays (one Python list each when decoded: ~300 MB).
- `bogus_revocations_reply`: a document-pull reply with 1,000 revocations signed by a key that
  is not the system key.

Push and pull are the document bus's (`p2pnode.platform.bus`, protocols/documents.md): a push is
`{"doc": envelope}`, a pull reply `{"docs": [envelope, …], "need_have": [], "more": false}`.
"""

from __future__ import annotations

from typing import Any

import cbor2

from p2pnode import codec, timefmt
from p2pnode.envelope import Envelope, signing_bytes
from p2pnode.cluster.documents import Member, Revocation, Snapshot
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr

MAX_PUSH = 4 << 20  # the bus's document limit (a push request may be 1 MiB more): a message this size is still read
SHARED_COPIES = 10_000
ADDRS_PER_MEMBER = 64


def sign_raw(type_: str, payload: bytes, key: KeyPair) -> Envelope:
    """An envelope over payload bytes exactly as given (Envelope.seal would re-encode them canonically)."""
    return Envelope(type_, payload, key.public_key, key.sign(signing_bytes(type_, payload)))


def shared_ref_snapshot(key: KeyPair, cluster_id: str, copies: int = SHARED_COPIES) -> Envelope:
    """A self-signed snapshot, issued now, listing one member `copies` times by reference."""
    pid = key.peer_id
    member = Member(
        pid, "m" * 128,
        tuple(Multiaddr.parse(f"/ip4/10.{i // 256}.{i % 256}.1/tcp/4100/p2p/{pid}") for i in range(ADDRS_PER_MEMBER)),
        tuple(f"label-{i}" for i in range(ADDRS_PER_MEMBER)),
    ).to_dict()
    payload = Snapshot(cluster_id, timefmt.now_ns(), pid, members=()).to_dict()
    payload["members"] = [member] * copies  # one object: cbor2 writes it once (tag 28), then tag 29 references
    return sign_raw("membership-snapshot", cbor2.dumps(payload, value_sharing=True), key)


def snapshot_push(env: Envelope) -> bytes:
    """A document-push request carrying `env`."""
    return codec.encode({"doc": env.to_dict()})


def cbor_bomb_push(size: int = MAX_PUSH) -> bytes:
    """{"doc": [[], [], …]} filling `size` bytes: one byte per empty array."""
    head = b"\xa1" + cbor2.dumps("doc")
    count = size - len(head) - 5  # 0x9a + 4-byte count
    return head + b"\x9a" + count.to_bytes(4, "big") + b"\x80" * count


def bogus_revocations_reply(key: KeyPair, cluster_id: str, count: int = 1000) -> dict[str, Any]:
    """A pull reply: no snapshot, `count` revocations each signed by `key` (not the system key)."""
    rev = Revocation(cluster_id, timefmt.now_ns(), (key.peer_id,), "x").sign(key)
    return pull_reply([rev] * count)


def snapshot_reply(env: Envelope) -> dict[str, Any]:
    """A pull reply carrying `env` alone."""
    return pull_reply([env])


def pull_reply(envelopes: list[Envelope]) -> dict[str, Any]:
    """A complete document-pull reply (one round: nothing more, no have lists wanted)."""
    return {"docs": [env.to_dict() for env in envelopes], "need_have": [], "more": False}
