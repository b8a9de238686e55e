"""The document bus as a service: restores every registered type at load, owns the bus's
forwarding tasks, counts rejections for status, and serves `POST /push` on the control socket
(any signed document, CBOR as hex or base64 in JSON {"envelope": "..."}) → the verdict."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ..envelope import Envelope
from ..errors import DecodeError
from .bus import DocumentBus
from .service import ControlRequest, Route, Service


class DocumentService(Service):
    name = "documents"

    def __init__(self, bus: DocumentBus):
        self.bus = bus

    async def load(self) -> None:
        await self.bus.load()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.bus.run(task_status=task_status)

    def status(self) -> Mapping[str, Any]:
        return {"documents": {t: len(held) for t, held in self.bus.held.items()},
                "forward_drops": self.bus.forward_drops}

    def routes(self) -> Sequence[Route]:
        return [Route("POST", "/push", self._push, 'body {"envelope": "<hex or base64 CBOR>"}: offer a signed document')]

    async def _push(self, request: ControlRequest) -> tuple[int, Any]:
        try:
            body = request.json()
            blob = body["envelope"]
            data = bytes.fromhex(blob) if all(c in "0123456789abcdefABCDEF" for c in blob) else base64.b64decode(blob, validate=True)
            env = Envelope.from_bytes(data)
        except (ValueError, KeyError, TypeError, binascii.Error, DecodeError) as exc:
            return 400, {"error": f'body must be JSON {{"envelope": "<hex or base64 CBOR>"}} holding a signed document: {exc}'}
        verdict = await self.bus.offer(env, None)
        return (422 if verdict.result == "rejected" else 200), verdict.to_dict()
