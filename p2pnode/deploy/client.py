"""Client side of the deploy protocols, for the admin tool, tests and benchmarks.

`manifest_for` hashes a file into a signed artifact manifest; `upload` hands the file to one node
(`/p2pnode/artifact-upload/1.0.0`: the manifest, then the blocks the node lacks as raw bytes); `query` asks a node
about deploys (`/p2pnode/deploy-query/1.0.0`); `follow` polls a deploy's record until it is settled.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import codec, timefmt
from ..envelope import Envelope
from ..errors import P2PNodeError, ProtocolError
from ..identity import KeyPair, PeerId
from ..platform import rpc
from ..streamio import MessageReader, send_message
from .documents import Manifest, hash_file
from .service import QUERY, QUERY_LIMITS
from .store import UPLOAD, UPLOAD_FRAME, UPLOAD_STEP_TIMEOUT


class UploadRefused(P2PNodeError):
    def __init__(self, code: str, reason: str):
        super().__init__(f"upload refused ({code}): {reason}")
        self.code = code
        self.reason = reason


@attrs.frozen
class UploadResult:
    sha256: str
    size: int
    sent_bytes: int  # block bytes this upload sent (less than size when the node had some already)
    node: str


async def manifest_for(path: str | os.PathLike[str], key: KeyPair, proof: Envelope, cluster_id: str, *,
                       origin: PeerId | None = None, name: str | None = None) -> tuple[Manifest, Envelope]:
    sha, size, block, blocks = await trio.to_thread.run_sync(hash_file, os.fspath(path))
    manifest = Manifest(sha, size, block, blocks, timefmt.now_ns(), name if name is not None else Path(path).name[:255], origin)
    return manifest, manifest.sign(key, proof, cluster_id)


async def upload(host: Any, peer: Any, path: str | os.PathLike[str], manifest: Manifest, env: Envelope,
                 progress: Callable[[int, int], None] | None = None) -> UploadResult:
    """Send the file to `peer` (a PeerId or Connection) under its signed manifest."""
    stream = await host.new_stream(peer, UPLOAD)
    sent = 0
    try:
        reader = MessageReader(stream, UPLOAD_FRAME)

        async def receive() -> dict[str, Any]:
            with trio.fail_after(UPLOAD_STEP_TIMEOUT):
                reply = codec.decode_map(await reader.one(), "artifact upload reply")
            if reply.get("result") == "refused":
                raise UploadRefused(str(reply.get("code")), str(reply.get("reason")))
            return reply

        await send_message(stream, codec.encode({"manifest": env.to_dict()}), UPLOAD_FRAME)
        reply = await receive()
        if reply.get("result") == "send":
            have = {i for i in reply.get("have", []) if isinstance(i, int)}
            fd = await trio.to_thread.run_sync(os.open, os.fspath(path), os.O_RDONLY)
            try:
                for index in range(len(manifest.blocks)):  # the blocks it lacks, raw, in index order
                    if index in have:
                        continue
                    start, end = manifest.block_range(index)
                    data = await trio.to_thread.run_sync(os.pread, fd, end - start, start)
                    if len(data) != end - start:
                        raise P2PNodeError(f"{path} changed while it was uploaded (block {index} is short); hash it again")
                    await stream.send_all(data)
                    sent += len(data)
                    if progress is not None:
                        progress(sent, manifest.size)
            except (P2PNodeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                with trio.move_on_after(2):  # the node may have said why it stopped reading
                    await receive()
                raise exc
            finally:
                os.close(fd)
            reply = await receive()
        if reply.get("result") != "stored":
            raise ProtocolError(f"artifact upload: unexpected reply {reply.get('result')!r}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
    node = str(getattr(peer, "peer_id", peer))
    return UploadResult(manifest.sha256, manifest.size, sent, node)


async def query(host: Any, peer: Any, message: dict[str, Any], auth: Envelope | None = None) -> dict[str, Any]:
    request = dict(message)
    if auth is not None:
        request["auth"] = auth.to_dict()
    return await rpc.request(host, peer, QUERY, request, QUERY_LIMITS)


async def status(host: Any, peer: Any, deploy_id: str, auth: Envelope | None = None) -> dict[str, Any] | None:
    reply = await query(host, peer, {"op": "status", "deploy_id": deploy_id}, auth)
    record = reply.get("record")
    return record if isinstance(record, dict) else None


async def follow(host: Any, peer: Any, deploy_id: str, *, auth: Envelope | None = None, timeout: float = 3600.0,
                 interval: float = 0.1, on_update: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None) -> dict[str, Any] | None:
    """Poll the deploy's record until it is settled (every target decided, reverts done) or `timeout`
    passes; returns the last record (None if the node never knew the deploy)."""
    last: dict[str, Any] | None = None
    deadline = trio.current_time() + timeout
    pause = interval
    while True:
        record = await status(host, peer, deploy_id, auth)
        if record is not None:
            last = record
            if on_update is not None:
                result = on_update(record)
                if result is not None:
                    await result
            if record.get("settled"):
                return record
        if trio.current_time() >= deadline:
            return last
        await trio.sleep(min(pause, max(0.0, deadline - trio.current_time())))
        pause = min(1.0, pause * 1.5)
