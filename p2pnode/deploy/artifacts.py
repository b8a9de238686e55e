"""Where a deploy's artifacts come from: `<artifact_dir>/<sha256>`, verified before use.

The network half fetches an artifact's blocks from peers into that place (or supplies its own
ArtifactSource that reports fetch progress); either way the executor only uses a file whose size
and SHA-256 match the command.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from .errors import DeployError
from .spec import ArtifactRef

CHUNK = 1024 * 1024
Progress = Callable[[int, int], Awaitable[None]]  # (bytes done, bytes total)


class ArtifactSource(Protocol):
    async def get(self, ref: ArtifactRef, progress: Progress) -> Path: ...


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


class LocalArtifacts:
    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, ref: ArtifactRef) -> Path:
        return self.directory / ref.sha256

    async def get(self, ref: ArtifactRef, progress: Progress) -> Path:
        path = self.path(ref)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DeployError(f"artifact {ref.sha256} is not on this node (expected at {path})") from None
        if size != ref.size:
            raise DeployError(f"artifact {ref.sha256} at {path} is {size} bytes; the command says {ref.size}")

        def report(done: int) -> None:
            trio.from_thread.run(progress, done, ref.size)

        digest = await trio.to_thread.run_sync(sha256_file, path, report)
        if digest != ref.sha256:
            raise DeployError(f"artifact at {path} has SHA-256 {digest}, not {ref.sha256}; refusing to use it")
        return path
