"""Artifacts in the mesh: stored under signed manifests, served as blocks, fetched from every peer that has them.

A node holds artifacts in its `artifact_dir`: `<sha256>` (complete, verified) and `<sha256>.part`
(being received; the blocks verified so far are served too, so targets of one wave help each
other). It accepts bytes only under a manifest signed by a deploy-role key (documents.py), and
only within its own limits (`max_artifact_bytes`, `min_free_bytes`).

- Upload (`/p2pnode/artifact-upload/1.0.0`, the admin tool → one node): the manifest first; the
  node answers which blocks it already has (a retry resumes), the tool sends the others as raw
  bytes in index order, each checked against its block hash, then the whole file's SHA-256 is
  checked, the file renamed into place, and the manifest offered to the document bus, so every
  node learns where to fetch from.
- Serving: a block-exchange provider (hash → bytes) over every complete or partly received artifact.
- Fetching (`get`, the executor's ArtifactSource): blocks in parallel from the manifest's origin
  and the peers known to hold the artifact first, then any member; each block verified by the
  exchange; then the whole SHA-256, before the file is used.
- Garbage collection (`collect`): a stored artifact no kept release, pending deploy or valid
  command references, older than `artifact_min_age`, is deleted.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from .. import codec, timefmt
from ..cluster.documents import Rejected, Trust
from ..envelope import Envelope
from ..errors import DecodeError
from ..identity import PeerId
from ..logfmt import fmt, limited
from ..platform.blocks import BlockExchange, BlockUnavailable, ByteBudget
from ..streamio import MessageReader, send_message
from .artifacts import Progress, sha256_file
from .config import DeployConfig
from .documents import MANIFEST, Manifest, verify_manifest
from .errors import DeployError
from .spec import ArtifactRef

UPLOAD = "/p2pnode/artifact-upload/1.0.0"
UPLOAD_STEP_TIMEOUT = 60.0  # per message of an upload
MAX_UPLOADS = 4  # at once, per node
FETCH_PARALLEL = 8  # block requests in flight per artifact
FETCH_BUDGET = 32 << 20  # bytes in flight per artifact
FETCH_ROUNDS = 5  # tries of one block over all candidates before giving up
MANIFEST_WAIT = 60.0  # seconds a fetch waits for the artifact's manifest to arrive on the bus
UPLOAD_FRAME = 4 << 20  # the manifest and the replies (the blocks follow as raw bytes)
RECEIVE_CHUNK = 256 * 1024

log = logging.getLogger("p2pnode.deploy.artifacts")

Candidates = Callable[[Manifest], list[PeerId]]


class ArtifactStore:
    def __init__(self, config: DeployConfig, directory: Path, blocks: BlockExchange, *, me: PeerId,
                 candidates: Candidates, now_ns: Callable[[], int]):
        self.config = config
        self.dir = directory
        self.blocks = blocks
        self.me = me
        self.candidates = candidates
        self.now_ns = now_ns
        self.manifests: dict[str, Manifest] = {}
        self._where: dict[bytes, list[tuple[str, int]]] = {}  # block hash -> (artifact, index)
        self._partial: dict[str, set[int]] = {}  # artifact -> verified block indices of its .part file
        self._locks: dict[str, trio.Lock] = {}
        self._manifest_arrived = trio.Event()
        self._uploads = 0
        self.uploaded_bytes = 0
        self.fetched_bytes = 0
        self.collected = 0
        blocks.add_provider(self.provide)

    # ---- manifests and the block index -----------------------------------------------------------------

    def add_manifest(self, manifest: Manifest) -> None:
        old = self.manifests.get(manifest.sha256)
        self.manifests[manifest.sha256] = manifest
        if old is None:
            for i, digest in enumerate(manifest.blocks):
                self._where.setdefault(digest, []).append((manifest.sha256, i))
        self._manifest_arrived.set()
        self._manifest_arrived = trio.Event()

    def path(self, sha256: str) -> Path:
        return self.dir / sha256

    def part(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.part"

    def holds(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    async def provide(self, digest: bytes) -> bytes | None:
        """A block of a stored or partly received artifact (the exchange checks the hash)."""
        for sha, index in self._where.get(digest, ()):
            manifest = self.manifests[sha]
            start, end = manifest.block_range(index)
            if self.path(sha).exists():
                path = self.path(sha)
            elif index in self._partial.get(sha, ()):
                path = self.part(sha)
            else:
                continue
            try:
                return await trio.to_thread.run_sync(_read_range, path, start, end - start)
            except OSError:
                continue
        return None

    # ---- limits -------------------------------------------------------------------------------------------

    def check_space(self, size: int, already: int = 0) -> None:
        """Refuse an artifact beyond this node's size limit or one that would fill its disk."""
        if size > self.config.max_artifact_bytes:
            raise DeployError(f"artifact of {size} bytes exceeds this node's deploy.max_artifact_bytes ({self.config.max_artifact_bytes})")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        free = shutil.disk_usage(self.dir).free
        if free - (size - already) < self.config.min_free_bytes:
            raise DeployError(f"storing {size} bytes in {self.dir} would leave {max(0, free - size + already)} bytes free, "
                              f"less than this node's deploy.min_free_bytes ({self.config.min_free_bytes})")

    def _lock(self, sha256: str) -> trio.Lock:
        return self._locks.setdefault(sha256, trio.Lock())

    # ---- receiving (shared by upload and fetch) -----------------------------------------------------------

    async def _open_part(self, manifest: Manifest) -> set[int]:
        """The .part file sized for the artifact, and which of its blocks are already verified
        (after a restart: re-hashed, so an interrupted transfer resumes)."""
        sha = manifest.sha256
        have = self._partial.get(sha)
        if have is not None:
            return have
        self.check_space(manifest.size, _size_of(self.part(sha)))
        have = await trio.to_thread.run_sync(_prepare_part, self.part(sha), manifest)
        self._partial[sha] = have
        return have

    async def _write_block(self, manifest: Manifest, index: int, data: bytes) -> None:
        start, _ = manifest.block_range(index)
        await trio.to_thread.run_sync(_write_range, self.part(manifest.sha256), start, data)
        self._partial.setdefault(manifest.sha256, set()).add(index)

    async def _finish(self, manifest: Manifest, progress: Progress | None = None) -> Path:
        sha = manifest.sha256
        part = self.part(sha)

        def report(done: int) -> None:
            if progress is not None:
                trio.from_thread.run(progress, done, manifest.size)

        digest = await trio.to_thread.run_sync(sha256_file, part, report)
        if digest != sha:
            self._partial.pop(sha, None)
            part.unlink(missing_ok=True)
            raise DeployError(f"artifact {sha}: the assembled file has SHA-256 {digest}; discarded")
        await trio.to_thread.run_sync(_install, part, self.path(sha))
        self._partial.pop(sha, None)
        return self.path(sha)

    # ---- the executor's ArtifactSource --------------------------------------------------------------------

    async def get(self, ref: ArtifactRef, progress: Progress) -> Path:
        """The artifact, verified; fetched from peers first if this node does not hold it."""
        async with self._lock(ref.sha256):
            path = self.path(ref.sha256)
            if path.exists():
                if _size_of(path) == ref.size:
                    def report(done: int) -> None:
                        trio.from_thread.run(progress, done, ref.size)
                    if await trio.to_thread.run_sync(sha256_file, path, report) == ref.sha256:
                        return path
                log.warning(fmt("artifact_corrupt", sha256=ref.sha256, path=path, action_taken="fetching again"))
                path.unlink(missing_ok=True)
            manifest = await self._manifest(ref)
            return await self._fetch(manifest, progress)

    async def _manifest(self, ref: ArtifactRef) -> Manifest:
        with trio.move_on_after(MANIFEST_WAIT):
            while ref.sha256 not in self.manifests:
                await self._manifest_arrived.wait()
        manifest = self.manifests.get(ref.sha256)
        if manifest is None:
            raise DeployError(f"artifact {ref.sha256} is not on this node and no manifest for it arrived within {MANIFEST_WAIT:g} s; "
                              "publish it first (p2pnode-admin artifact publish)")
        if manifest.size != ref.size:
            raise DeployError(f"artifact {ref.sha256}: the command says {ref.size} bytes, its manifest {manifest.size}")
        return manifest

    async def _fetch(self, manifest: Manifest, progress: Progress) -> Path:
        have = await self._open_part(manifest)
        missing = [i for i in range(len(manifest.blocks)) if i not in have]
        total = manifest.size
        done = sum(manifest.block_range(i)[1] - manifest.block_range(i)[0] for i in have)
        await progress(done, total)
        log.info(fmt("artifact_fetch", sha256=manifest.sha256[:16], size=total, blocks=len(missing), resumed=len(have) or None))
        budget = ByteBudget(FETCH_BUDGET)
        limit = trio.Semaphore(FETCH_PARALLEL)
        started = trio.current_time()
        errors: list[str] = []

        async def one(index: int) -> None:
            nonlocal done
            size = manifest.block_range(index)[1] - manifest.block_range(index)[0]
            await budget.acquire(size)
            try:
                data = await self._fetch_block(manifest, index)
                await self._write_block(manifest, index, data)
            except DeployError as exc:
                errors.append(str(exc))
                nursery.cancel_scope.cancel()
                return
            finally:
                budget.release(size)
                limit.release()
            done += len(data)
            self.fetched_bytes += len(data)
            await progress(done, total)

        async with trio.open_nursery() as nursery:
            for index in missing:
                await limit.acquire()
                nursery.start_soon(one, index)
        if errors:
            raise DeployError(errors[0])
        path = await self._finish(manifest)
        log.info(fmt("artifact_fetched", sha256=manifest.sha256[:16], size=total, seconds=round(trio.current_time() - started, 2)))
        return path

    async def _fetch_block(self, manifest: Manifest, index: int) -> bytes:
        digest = manifest.blocks[index]
        reason = ""
        for attempt in range(FETCH_ROUNDS):
            peers = [p for p in self.candidates(manifest) if p != self.me]
            try:
                data, _ = await self.blocks.fetch(digest, peers)
                return data
            except BlockUnavailable as exc:
                reason = str(exc)
            await trio.sleep(0.2 * 2**attempt)
        raise DeployError(f"artifact {manifest.sha256[:16]}…: block {index} is not available from any peer ({reason})")

    # ---- upload (the admin tool hands the file to this node) -------------------------------------------

    async def serve_upload(self, stream: Any, peer: PeerId, trust: Trust, offer: Callable[[Envelope], Awaitable[Any]]) -> None:
        reader = MessageReader(stream, UPLOAD_FRAME)

        async def reply(message: dict[str, Any]) -> None:
            await send_message(stream, codec.encode(message), UPLOAD_FRAME)

        async def refuse(code: str, reason: str) -> None:
            limited.info(log, fmt("artifact_upload_refused", peer=peer, code=code, reason=reason), key=("upload_refused", code))
            await reply({"result": "refused", "code": code, "reason": reason})

        with trio.fail_after(UPLOAD_STEP_TIMEOUT):
            first = codec.decode_map(await reader.one(), "artifact upload")
        try:
            env = Envelope.from_dict(first.get("manifest"), MANIFEST)
            manifest = verify_manifest(env, trust, self.now_ns())
        except Rejected as exc:
            await refuse(exc.code, str(exc))
            return
        except DecodeError as exc:
            await refuse("malformed", str(exc))
            return
        if self._uploads >= MAX_UPLOADS:
            await refuse("busy", f"this node is receiving {MAX_UPLOADS} uploads already; try again later")
            return
        self._uploads += 1
        try:
            async with self._lock(manifest.sha256):
                await self._receive(manifest, env, stream, reply, refuse, offer)
        finally:
            self._uploads -= 1

    async def _receive(self, manifest: Manifest, env: Envelope, stream: Any, reply: Callable[[dict[str, Any]], Awaitable[None]],
                       refuse: Callable[[str, str], Awaitable[None]], offer: Callable[[Envelope], Awaitable[Any]]) -> None:
        sha = manifest.sha256
        if self.holds(sha):
            self.add_manifest(manifest)
            await offer(env)
            await reply({"result": "stored", "sha256": sha, "received": 0})
            return
        try:
            have = await self._open_part(manifest)
        except (DeployError, OSError) as exc:
            await refuse("no_space" if isinstance(exc, DeployError) else "io", str(exc))
            return
        missing = [i for i in range(len(manifest.blocks)) if i not in have]
        await reply({"result": "send", "have": sorted(have)})
        # The missing blocks follow as raw bytes, in index order: read block by block (never more
        # than one block held), each checked against its hash before it is written.
        received = 0
        for index in missing:
            start, end = manifest.block_range(index)
            block = bytearray()
            while len(block) < end - start:
                with trio.fail_after(UPLOAD_STEP_TIMEOUT):
                    chunk = await stream.receive_some(min(RECEIVE_CHUNK, end - start - len(block)))
                if not chunk:
                    await refuse("incomplete", f"the upload ended in block {index}; send it again (it resumes where it stopped)")
                    return
                block += chunk
            if hashlib.sha256(block).digest() != manifest.blocks[index]:
                await refuse("bad_block", f"block {index} does not match the manifest's hash for it")
                return
            await self._write_block(manifest, index, bytes(block))
            received += len(block)
            self.uploaded_bytes += len(block)
        try:
            await self._finish(manifest)
        except DeployError as exc:
            await refuse("bad_file", str(exc))
            return
        self.add_manifest(manifest)
        verdict = await offer(env)
        log.info(fmt("artifact_stored", sha256=sha[:16], size=manifest.size, received=received, name=manifest.name or None,
                     manifest=getattr(verdict, "result", None)))
        await reply({"result": "stored", "sha256": sha, "received": received})

    # ---- garbage collection -------------------------------------------------------------------------------

    async def collect(self, referenced: Iterable[str]) -> list[str]:
        """Delete stored artifacts (and abandoned partial ones) nothing references, once older
        than artifact_min_age; returns the SHA-256 of those deleted."""
        keep = set(referenced) | {sha for sha, lock in self._locks.items() if lock.locked()}
        now = self.now_ns()
        min_age = int(self.config.artifact_min_age * timefmt.NS)

        def sweep() -> list[str]:
            removed = []
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                return []
            for name in names:
                sha = name.removesuffix(".part")
                if len(sha) != 64 or sha in keep:
                    continue
                manifest = self.manifests.get(sha)
                try:
                    born = max(os.stat(self.dir / name).st_mtime_ns, manifest.issued_at_ns if manifest else 0)
                except FileNotFoundError:
                    continue
                if now - born < min_age:
                    continue
                (self.dir / name).unlink(missing_ok=True)
                removed.append(sha)
            return removed

        removed = await trio.to_thread.run_sync(sweep)
        for sha in removed:
            self._partial.pop(sha, None)
        if removed:
            self.collected += len(removed)
            log.info(fmt("artifacts_collected", count=len(removed), sha256=",".join(s[:12] for s in removed[:5])))
        return removed

    def status(self) -> dict[str, Any]:
        try:
            stored = sorted(n for n in os.listdir(self.dir) if len(n) == 64)
        except FileNotFoundError:
            stored = []
        return {"stored": len(stored), "receiving": len(self._partial), "manifests": len(self.manifests),
                "uploaded_bytes": self.uploaded_bytes, "fetched_bytes": self.fetched_bytes, "collected": self.collected}


# ---- blocking helpers (run in a thread) ---------------------------------------------------------------

def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_range(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        return os.pread(fh.fileno(), length, start)


def _write_range(path: Path, start: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, data, start)
    finally:
        os.close(fd)


def _prepare_part(path: Path, manifest: Manifest) -> set[int]:
    """Create (or reopen) the .part file at the artifact's size; the blocks in it that already verify."""
    have: set[int] = set()
    existed = path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if existed and os.fstat(fd).st_size == manifest.size:
            for i, digest in enumerate(manifest.blocks):
                start, end = manifest.block_range(i)
                if hashlib.sha256(os.pread(fd, end - start, start)).digest() == digest:
                    have.add(i)
        else:
            os.ftruncate(fd, manifest.size)
    finally:
        os.close(fd)
    return have


def _install(part: Path, final: Path) -> None:
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(part, 0o644)
    os.replace(part, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(dfd)


__all__ = ["ArtifactStore", "UPLOAD"]
