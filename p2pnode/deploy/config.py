"""The node's `deploy` settings (a section of its config.json), validated with errors naming the field.

Deploys are off unless `allowed_roots` names at least one directory: a command whose application
root is not inside one of them is refused. Everything else has a default. The artifact limits bound
what this node stores for the mesh: an upload or a fetch larger than `max_artifact_bytes`, or one
that would leave less than `min_free_bytes` free on the artifact filesystem, is refused; stored
artifacts younger than `artifact_min_age` seconds are kept even when nothing references them yet
(an upload waiting for its deploy command).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import attrs

from ..config import ConfigError
from .tarsafe import TarLimits


@attrs.frozen
class DeployConfig:
    allowed_roots: tuple[Path, ...] = ()
    host: str = attrs.field(factory=socket.gethostname)  # the value of ${host}
    env: tuple[tuple[str, str], ...] = ()  # variables this node adds to every deploy (e.g. where its certificates are)
    artifact_dir: Path | None = None  # where artifacts are found by SHA-256; default <data_dir>/artifacts
    docker_command: tuple[str, ...] = ("docker",)
    docker_env: tuple[tuple[str, str], ...] = ()  # e.g. CONTAINERS_CONF for podman
    systemd_unit_dir: Path = Path("/etc/systemd/system")
    systemctl: tuple[str, ...] = ("systemctl",)
    service_user: str | None = None  # User= of generated units; none: the unit runs as systemd's default
    shell: str = "/bin/bash"
    max_log_bytes: int = 256 * 1024
    max_pending_per_app: int = 16
    keep_finished: int = 1000
    kill_grace: float = 2.0
    tar: TarLimits = TarLimits()
    max_artifact_bytes: int = 8 * 1024**3
    min_free_bytes: int = 1024**3
    artifact_min_age: float = 3600.0
    report_interval: float = 1.0  # progress reports of one deploy are coalesced to one per this many seconds

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_roots)

    def to_json(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what config.json needs to say)."""
        out: dict[str, Any] = {"allowed_roots": [str(p) for p in self.allowed_roots]}
        default = DeployConfig(host=self.host)
        for field in attrs.fields(DeployConfig):
            value = getattr(self, field.name)
            if field.name in ("allowed_roots", "tar") or value == getattr(default, field.name):
                continue
            if isinstance(value, Path):
                value = str(value)
            elif field.name in ("env", "docker_env"):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        if self.host != socket.gethostname():
            out["host"] = self.host
        else:
            out.pop("host", None)
        if self.tar != TarLimits():
            out.update(max_archive_entries=self.tar.max_entries, max_archive_bytes=self.tar.max_total_bytes)
        return out


def _fail(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field 'deploy.{field}': invalid value {value!r}; {allowed}")


def _str_list(raw: dict[str, Any], key: str, hint: str) -> tuple[str, ...]:
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(key, value, hint)
    return tuple(value)


def _env(raw: dict[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    value = raw[key]
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
        raise _fail(key, value, 'expected a map such as {"NAME": "value"}')
    return tuple(sorted(value.items()))


def parse(raw: dict[str, Any], data_dir: Path) -> DeployConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config field 'deploy' must be a JSON object")
    known = set(attrs.fields_dict(DeployConfig)) - {"tar"} | {"max_archive_entries", "max_archive_bytes"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"config field 'deploy.{key}' is unknown; allowed: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {"artifact_dir": data_dir / "artifacts"}
    if "allowed_roots" in raw:
        roots = _str_list(raw, "allowed_roots", 'expected a list of absolute directories, e.g. ["/opt/apps"]')
        if not all(os.path.isabs(r) for r in roots):
            raise _fail("allowed_roots", raw["allowed_roots"], "every root must be an absolute path")
        kw["allowed_roots"] = tuple(Path(r) for r in roots)
    for key in ("host", "shell", "service_user"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise _fail(key, raw[key], "expected a non-empty string")
            kw[key] = raw[key]
    for key in ("artifact_dir", "systemd_unit_dir"):
        if key in raw:
            if not isinstance(raw[key], str) or not os.path.isabs(raw[key]):
                raise _fail(key, raw[key], "expected an absolute directory")
            kw[key] = Path(raw[key])
    for key in ("docker_command", "systemctl"):
        if key in raw:
            kw[key] = _str_list(raw, key, 'expected the command as a list, e.g. ["podman"]')
            if not kw[key]:
                raise _fail(key, raw[key], "must name a program")
    for key in ("env", "docker_env"):
        if key in raw:
            kw[key] = _env(raw, key)
    for key, low, high in (("max_log_bytes", 4096, 64 * 1024**2), ("max_pending_per_app", 1, 1000), ("keep_finished", 10, 10**6),
                           ("max_artifact_bytes", 1, 1 << 46), ("min_free_bytes", 0, 1 << 50)):
        if key in raw:
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or not low <= raw[key] <= high:
                raise _fail(key, raw[key], f"expected an integer from {low} to {high}")
            kw[key] = raw[key]
    for key, low, high in (("kill_grace", 0, 300), ("artifact_min_age", 0, 30 * 86400), ("report_interval", 0, 60)):
        if key in raw:
            if isinstance(raw[key], bool) or not isinstance(raw[key], (int, float)) or not low <= raw[key] <= high:
                raise _fail(key, raw[key], f"expected seconds from {low} to {high}")
            kw[key] = float(raw[key])
    limits = {}
    for key, name in (("max_archive_entries", "max_entries"), ("max_archive_bytes", "max_total_bytes")):
        if key in raw:
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1:
                raise _fail(key, raw[key], "expected a positive integer")
            limits[name] = raw[key]
    if limits:
        kw["tar"] = TarLimits(**limits)
    return DeployConfig(**kw)
