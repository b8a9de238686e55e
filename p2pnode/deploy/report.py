"""Deploy statuses (the seed's names), progress ranges, and the status report each change produces.

A report is what the network half signs and spreads (the seed's DeployStatusReport): which deploy,
its type, application and version, the status and 0-100 progress, a stage (the step in words),
a message, the tail of the log, when, a per-deploy sequence number (newer wins), whether it is the
deploy's last report, and then whether it succeeded.
"""

from __future__ import annotations

from typing import Any

import attrs

from .. import timefmt
from ..codec import Fields
from ..errors import DecodeError
from .spec import KINDS, choice

PENDING = "pending"
EXECUTING = "executing"
SCRIPT_RUNNING = "script_running"
HEALTH_CHECK = "health_check"
SUCCESS = "success"
FAILED = "failed"
TIMEOUT = "timeout"
UPLOADING = "uploading"
EXTRACTING = "extracting"
INSTALLING = "installing"
PULLING = "pulling"
STOPPING = "stopping"
STARTING = "starting"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"
STATUSES = (PENDING, EXECUTING, SCRIPT_RUNNING, HEALTH_CHECK, SUCCESS, FAILED, TIMEOUT, UPLOADING, EXTRACTING,
            INSTALLING, PULLING, STOPPING, STARTING, ROLLING_BACK, ROLLED_BACK, ROLLBACK_FAILED)

# progress range of each working status, per command type (the seed gives tar's; the others follow it)
RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "deploy.shell": {EXECUTING: (0, 10), SCRIPT_RUNNING: (10, 70), STARTING: (70, 80), HEALTH_CHECK: (80, 100)},
    "deploy.tar": {EXECUTING: (0, 0), UPLOADING: (0, 30), EXTRACTING: (30, 60), INSTALLING: (60, 90), HEALTH_CHECK: (90, 100)},
    "deploy.docker": {EXECUTING: (0, 10), PULLING: (10, 40), STOPPING: (40, 50), STARTING: (50, 70), HEALTH_CHECK: (70, 100)},
    "deploy.rollback": {ROLLING_BACK: (10, 80), HEALTH_CHECK: (80, 100)},
}

MAX_LOG_TAIL = 2048
MAX_MESSAGE = 2048


@attrs.frozen
class DeployReport:
    deploy_id: str
    command_type: str
    app: str  # project/name/env
    version: str | None
    status: str
    progress: int
    stage: str
    message: str
    seq: int
    at_ns: int
    final: bool = False
    success: bool | None = None
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "deploy_id": self.deploy_id, "command_type": self.command_type, "app": self.app, "status": self.status,
            "progress": self.progress, "stage": self.stage, "message": self.message, "seq": self.seq,
            "timestamp": timefmt.format_ns(self.at_ns), "final": self.final, "logs": self.log_tail}
        if self.version is not None:
            out["version"] = self.version
        if self.success is not None:
            out["success"] = self.success
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> DeployReport:
        f = Fields(raw, "deploy report")
        kind, status = choice(f, "command_type", KINDS), choice(f, "status", STATUSES)
        progress = f.integer("progress")
        if not 0 <= progress <= 100:
            raise DecodeError("deploy report: field 'progress' must be 0-100")
        try:
            at_ns = timefmt.parse_ns(f.text("timestamp", max_len=64))
        except DecodeError as exc:
            raise DecodeError(f"deploy report: field 'timestamp': {exc}") from None
        return cls(f.text("deploy_id", max_len=128), kind, f.text("app", max_len=200), f.text("version", optional=True, max_len=128),
                   status, progress, f.text("stage", max_len=256), f.text("message", max_len=MAX_MESSAGE), f.integer("seq"), at_ns,
                   f.boolean("final"), f.boolean("success", optional=True), f.text("logs", optional=True, default="", max_len=MAX_LOG_TAIL))
