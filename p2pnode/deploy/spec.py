"""Deploy commands as values: `deploy.shell`, `deploy.tar`, `deploy.docker`, `deploy.rollback`.

A command names an application (`project/name/env`, as in the agent seed), the version it installs,
the application root its releases live under, an optional health check and service, how many
releases to keep, its targets and rollout, and a validity window. The network half signs and
relays these; here they are plain frozen values with `to_dict()/from_dict()` for CBOR. Decoding
validates every field at the edge and names it in the DecodeError; every string, list and map has
a hard limit. `${installPath}`, `${env}`, `${version}` and `${host}` in the command's strings are
substituted per release by `DeployCommand.resolve` (other `${...}`, such as shell variables, are
left alone); `${host}` in the application root is substituted by the node before it runs the
command (several hosts sharing one filesystem, or several nodes on one machine).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from .. import codec, timefmt
from ..codec import Fields
from ..errors import DecodeError
from ..identity import PeerId

SHELL = "deploy.shell"
TAR = "deploy.tar"
DOCKER = "deploy.docker"
ROLLBACK = "deploy.rollback"
KINDS = (SHELL, TAR, DOCKER, ROLLBACK)

MAX_COMMAND_BYTES = 512 * 1024
MAX_SCRIPT_BYTES = 100 * 1024  # the seed's script size limit (deploy-30)
MAX_ENV = 128
MAX_ENV_VALUE = 8192
MAX_TIMEOUT = 24 * 3600.0
MAX_KEEP_RELEASES = 100
MAX_ARTIFACT_SIZE = 64 * 1024**3
MAX_FILES = 64
MAX_LIST = 64
MAX_ITEM = 1024
MAX_PEERS = 10_000
MAX_LABELS = 64
MAX_FUTURE_NS = 5 * 60 * timefmt.NS  # commands dated further ahead than this are refused
MAX_WINDOW_NS = 30 * 24 * 3600 * timefmt.NS
DEFAULT_PROGRESS_DEADLINE = 600.0  # Nomad's progress_deadline default (10 min)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_DEPLOY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VARS = re.compile(r"\$\{(installPath|env|version|host)\}")
RESERVED_VERSIONS = ("current",)

HEALTH_TYPES = ("http", "tcp", "script")
SERVICE_TYPES = ("systemd", "scripts")
PULL_POLICIES = ("always", "if_not_present", "never")

Env = tuple[tuple[str, str], ...]
T = TypeVar("T")


# ---- variable substitution -------------------------------------------------------------------------

@attrs.frozen
class Vars:
    """The values of `${installPath}`, `${env}`, `${version}`, `${host}` for one release on one node."""

    install_path: str
    env: str
    version: str
    host: str

    def apply(self, text: str) -> str:
        values = {"installPath": self.install_path, "env": self.env, "version": self.version, "host": self.host}
        return _VARS.sub(lambda m: values[m.group(1)], text)

    def apply_opt(self, text: str | None) -> str | None:
        return None if text is None else self.apply(text)

    def apply_all(self, items: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.apply(x) for x in items)

    def apply_env(self, env: Env) -> Env:
        return tuple((k, self.apply(v)) for k, v in env)


# ---- field helpers -----------------------------------------------------------------------------------

def _pattern(f: Fields, key: str, pattern: re.Pattern[str], hint: str, optional: bool = False) -> str | None:
    value = f.text(key, optional=optional, max_len=256)
    if value is not None and not pattern.fullmatch(value):
        raise DecodeError(f"{f.what}: field {key!r} is {value!r}; expected {hint}")
    return value


def choice(f: Fields, key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    """A text field that must be one of `allowed` (the error lists them)."""
    value = f.text(key, optional=default is not None, default=default, max_len=64)
    if value not in allowed:
        raise DecodeError(f"{f.what}: field {key!r} is {value!r}; allowed: {', '.join(allowed)}")
    return value


def _req(f: Fields, key: str, pattern: re.Pattern[str], hint: str) -> str:
    value = _pattern(f, key, pattern, hint)
    assert value is not None
    return value


def _script(f: Fields, key: str, optional: bool = False) -> str | None:
    value = f.text(key, optional=optional, max_len=4 * MAX_SCRIPT_BYTES)  # characters; the byte limit follows
    if value is not None and len(value.encode()) > MAX_SCRIPT_BYTES:
        raise DecodeError(f"{f.what}: field {key!r} is larger than {MAX_SCRIPT_BYTES} bytes (the script size limit)")
    if value is not None and "\x00" in value:
        raise DecodeError(f"{f.what}: field {key!r} contains a NUL byte")
    return value


def _seconds(f: Fields, key: str, default: float, low: float = 0.001, high: float = MAX_TIMEOUT) -> float:
    if isinstance(f.raw.get(key), bool):
        raise DecodeError(f"{f.what}: field {key!r} must be a number of seconds")
    value = f.number(key, optional=True, default=default)
    if value is None or not low <= value <= high:
        raise DecodeError(f"{f.what}: field {key!r} is {value}; expected seconds between {low} and {high:g}")
    return value


def _int(f: Fields, key: str, default: int, low: int, high: int) -> int:
    value = f.integer(key, optional=True, default=default)
    if not low <= value <= high:
        raise DecodeError(f"{f.what}: field {key!r} is {value}; expected {low} to {high}")
    return value


def _strings(f: Fields, key: str, max_items: int = MAX_LIST, max_len: int = MAX_ITEM) -> tuple[str, ...]:
    items = f.items(key, optional=True, max_items=max_items)
    for i, item in enumerate(items):
        if not isinstance(item, str) or len(item) > max_len or "\x00" in item:
            raise DecodeError(f"{f.what}: field {key!r}[{i}] must be a string of at most {max_len} characters")
    return tuple(items)


def _env(f: Fields, key: str) -> Env:
    raw = f.raw.get(key, {})
    if not isinstance(raw, dict):
        raise DecodeError(f"{f.what}: field {key!r} must be a map of NAME to text")
    if len(raw) > MAX_ENV:
        raise DecodeError(f"{f.what}: field {key!r} has more than {MAX_ENV} variables")
    out = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise DecodeError(f"{f.what}: field {key!r} has an invalid variable name {name!r}")
        if not isinstance(value, str) or len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise DecodeError(f"{f.what}: field {key!r}: {name} must be text of at most {MAX_ENV_VALUE} characters")
        out.append((name, value))
    return tuple(sorted(out))


def _sub(f: Fields, key: str, decode: Callable[[dict[Any, Any]], T], optional: bool = True) -> T | None:
    if key not in f.raw:
        if optional:
            return None
        raise DecodeError(f"{f.what}: missing field {key!r}")
    value = f.raw[key]
    if not isinstance(value, dict):
        raise DecodeError(f"{f.what}: field {key!r} must be a map")
    return decode(value)


def _time(f: Fields, key: str) -> int:
    try:
        return timefmt.parse_ns(f.text(key, max_len=64))
    except DecodeError as exc:
        raise DecodeError(f"{f.what}: field {key!r}: {exc}") from None


def relative_path(value: str, what: str) -> str:
    """A path inside a release: relative, no `..`, no empty components; returned normalised."""
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not value or value.startswith("/") or ".." in parts or not parts or "\x00" in value or len(value) > MAX_ITEM:
        raise DecodeError(f"{what}: {value!r} must be a relative path inside the release (no '..', not absolute)")
    return "/".join(parts)


def _relpath(f: Fields, key: str, default: str | None = None) -> str:
    value = f.text(key, optional=default is not None, default=default, max_len=MAX_ITEM)
    return relative_path(value, f"{f.what}: field {key!r}")


def _env_dict(env: Env) -> dict[str, str]:
    return dict(env)


# ---- parts of a command ------------------------------------------------------------------------------

@attrs.frozen
class Application:
    project: str
    name: str
    env: str

    @property
    def key(self) -> str:
        return f"{self.project}/{self.name}/{self.env}"

    @property
    def unit_name(self) -> str:
        return f"{self.project}-{self.name}-{self.env}.service"

    def to_dict(self) -> dict[str, Any]:
        return {"project": self.project, "name": self.name, "env": self.env}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> Application:
        f = Fields(raw, "deploy app")
        hint = "letters, digits, '_', '.', '-' (1-64, starting with a letter or digit)"
        return cls(_req(f, "project", _NAME, hint), _req(f, "name", _NAME, hint), _req(f, "env", _NAME, hint))


@attrs.frozen
class HealthCheck:
    """HTTP (status, optional body match), TCP connect, or a script's exit code.

    `timeout` bounds the whole check (Nomad's healthy_deadline); a failed attempt is retried
    `retries` times, `interval` apart; each attempt gets at most `attempt_timeout`. Once an attempt
    passes, the check must keep passing for `min_healthy_time` (Nomad's min_healthy_time)."""

    type: str
    url: str | None = None
    expect_status: int = 200
    body_contains: str | None = None
    host: str | None = None
    port: int | None = None
    script: str | None = None
    timeout: float = 60.0
    retries: int = 3
    interval: float = 10.0
    attempt_timeout: float = 10.0
    min_healthy_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "timeout": self.timeout, "retries": self.retries, "interval": self.interval,
                               "attempt_timeout": self.attempt_timeout, "min_healthy_time": self.min_healthy_time}
        if self.type == "http":
            out.update(url=self.url, expect_status=self.expect_status)
            if self.body_contains is not None:
                out["body_contains"] = self.body_contains
        elif self.type == "tcp":
            out.update(host=self.host, port=self.port)
        else:
            out["script"] = self.script
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> HealthCheck:
        f = Fields(raw, "deploy health")
        kind = choice(f, "type", HEALTH_TYPES)
        common: dict[str, Any] = dict(
            timeout=_seconds(f, "timeout", 60.0), retries=_int(f, "retries", 3, 0, 100),
            interval=_seconds(f, "interval", 10.0, 0.0, 3600.0), attempt_timeout=_seconds(f, "attempt_timeout", 10.0),
            min_healthy_time=_seconds(f, "min_healthy_time", 0.0, 0.0, 3600.0))
        if kind == "http":
            url = f.text("url", max_len=MAX_ITEM)
            parts = urlsplit(url.replace("${host}", "host"))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise DecodeError(f"deploy health: field 'url' is {url!r}; expected http://host[:port]/path or https://…")
            return cls("http", url=url, expect_status=_int(f, "expect_status", 200, 100, 599),
                       body_contains=f.text("body_contains", optional=True, max_len=MAX_ITEM), **common)
        if kind == "tcp":
            return cls("tcp", host=f.text("host", max_len=255), port=_int(f, "port", 0, 1, 65535), **common)
        return cls("script", script=_script(f, "script"), **common)

    def resolve(self, v: Vars) -> HealthCheck:
        return attrs.evolve(self, url=v.apply_opt(self.url), host=v.apply_opt(self.host), script=v.apply_opt(self.script),
                            body_contains=v.apply_opt(self.body_contains))


@attrs.frozen
class Service:
    """How the application runs: a generated systemd unit `<project>-<name>-<env>.service` whose
    ExecStart is `command`, or the release's own `start`/`stop` scripts (the lightnode way)."""

    type: str
    command: str | None = None
    start: str = "start.sh"
    stop: str = "stop.sh"
    env: Env = ()
    timeout: float = 60.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "timeout": self.timeout}
        if self.type == "systemd":
            out.update(command=self.command, env=_env_dict(self.env))
        else:
            out.update(start=self.start, stop=self.stop)
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> Service:
        f = Fields(raw, "deploy service")
        kind = choice(f, "type", SERVICE_TYPES)
        timeout = _seconds(f, "timeout", 60.0)
        if kind == "systemd":
            command = f.text("command", max_len=MAX_ITEM)
            if not command.strip() or "\n" in command:
                raise DecodeError("deploy service: field 'command' must be one non-empty line (the unit's ExecStart)")
            return cls("systemd", command=command, env=_env(f, "env"), timeout=timeout)
        return cls("scripts", start=_relpath(f, "start", "start.sh"), stop=_relpath(f, "stop", "stop.sh"),
                   timeout=timeout)

    def resolve(self, v: Vars) -> Service:
        return attrs.evolve(self, command=v.apply_opt(self.command), env=v.apply_env(self.env))


@attrs.frozen
class Targets:
    """Which nodes run the command: peer IDs and/or nodes carrying any of the labels, or every member."""

    peers: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    all: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"peers": list(self.peers), "labels": list(self.labels), "all": self.all}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> Targets:
        f = Fields(raw, "deploy targets")
        peers = _strings(f, "peers", MAX_PEERS, 128)
        for p in peers:
            try:
                PeerId.from_string(p)
            except DecodeError as exc:
                raise DecodeError(f"deploy targets: field 'peers' has {p!r}: {exc}") from None
        labels = _strings(f, "labels", MAX_LABELS, 64)
        every = f.boolean("all", optional=True, default=False)
        if every and (peers or labels):
            raise DecodeError("deploy targets: 'all' excludes 'peers' and 'labels'")
        if not every and not peers and not labels:
            raise DecodeError("deploy targets: name peers, labels, or all: true")
        return cls(peers, labels, every)


@attrs.frozen
class Rollout:
    """Waves across nodes (Nomad's update stanza): at most `max_parallel` at a time; more than
    `max_failures` failed nodes halt the rest, and `auto_revert` rolls the updated ones back.
    `progress_deadline` (Nomad's): a node of a wave that has sent no final report this many
    seconds after its wave could start counts as failed (see p2pnode/deploy/rollout.py)."""

    max_parallel: int = 1
    max_failures: int = 0
    auto_revert: bool = False
    progress_deadline: float = DEFAULT_PROGRESS_DEADLINE

    def to_dict(self) -> dict[str, Any]:
        return {"max_parallel": self.max_parallel, "max_failures": self.max_failures, "auto_revert": self.auto_revert,
                "progress_deadline": self.progress_deadline}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> Rollout:
        f = Fields(raw, "deploy rollout")
        return cls(_int(f, "max_parallel", 1, 1, MAX_PEERS), _int(f, "max_failures", 0, 0, MAX_PEERS),
                   f.boolean("auto_revert", optional=True, default=False),
                   _seconds(f, "progress_deadline", DEFAULT_PROGRESS_DEADLINE, 1.0, MAX_TIMEOUT))


@attrs.frozen
class ArtifactRef:
    """A file by content: its SHA-256 (lowercase hex) and size in bytes."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any], what: str = "deploy artifact") -> ArtifactRef:
        f = Fields(raw, what)
        return cls(_req(f, "sha256", _SHA256, "64 lowercase hex digits"), _int(f, "size", -1, 0, MAX_ARTIFACT_SIZE))


@attrs.frozen
class FileArtifact:
    """A single file (a binary, a genesis file) placed at `path` inside the release with `mode`."""

    artifact: ArtifactRef
    path: str
    mode: int = 0o644

    def to_dict(self) -> dict[str, Any]:
        return {**self.artifact.to_dict(), "path": self.path, "mode": self.mode}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> FileArtifact:
        f = Fields(raw, "deploy file")
        mode = _int(f, "mode", 0o644, 0, 0o777)
        return cls(ArtifactRef.from_dict(raw, "deploy file"), _relpath(f, "path"), mode)


# ---- the four actions --------------------------------------------------------------------------------

@attrs.frozen
class ShellAction:
    script: str
    working_dir: str = "${installPath}"
    env: Env = ()
    timeout: float = 600.0
    rollback_script: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"script": self.script, "working_dir": self.working_dir, "env": _env_dict(self.env),
                               "timeout": self.timeout}
        if self.rollback_script is not None:
            out["rollback_script"] = self.rollback_script
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> ShellAction:
        f = Fields(raw, "deploy.shell")
        return cls(_script(f, "script") or "", f.text("working_dir", optional=True, default="${installPath}", max_len=MAX_ITEM),
                   _env(f, "env"), _seconds(f, "timeout", 600.0), _script(f, "rollback_script", optional=True))

    def resolve(self, v: Vars) -> ShellAction:
        return attrs.evolve(self, script=v.apply(self.script), working_dir=v.apply(self.working_dir), env=v.apply_env(self.env),
                            rollback_script=v.apply_opt(self.rollback_script))


@attrs.frozen
class TarAction:
    archive: ArtifactRef
    files: tuple[FileArtifact, ...] = ()
    install_script: str | None = None
    install_timeout: float = 600.0
    env: Env = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"archive": self.archive.to_dict(), "files": [x.to_dict() for x in self.files],
                               "install_timeout": self.install_timeout, "env": _env_dict(self.env)}
        if self.install_script is not None:
            out["install_script"] = self.install_script
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> TarAction:
        f = Fields(raw, "deploy.tar")
        archive = _sub(f, "archive", lambda r: ArtifactRef.from_dict(r, "deploy.tar archive"), optional=False)
        assert archive is not None
        files = []
        for item in f.items("files", optional=True, max_items=MAX_FILES):
            if not isinstance(item, dict):
                raise DecodeError("deploy.tar: field 'files' must hold maps")
            files.append(FileArtifact.from_dict(item))
        return cls(archive, tuple(files), _script(f, "install_script", optional=True), _seconds(f, "install_timeout", 600.0),
                   _env(f, "env"))

    def resolve(self, v: Vars) -> TarAction:
        return attrs.evolve(self, install_script=v.apply_opt(self.install_script), env=v.apply_env(self.env))

    @property
    def artifacts(self) -> tuple[ArtifactRef, ...]:
        return (self.archive, *(x.artifact for x in self.files))


@attrs.frozen
class DockerAction:
    """Pull (per `pull`: always, if_not_present, never), or `docker load` an image archive artifact
    when `archive` is given (no registry needed); stop and remove the old container; run the new one."""

    image: str
    name: str | None = None
    ports: tuple[str, ...] = ()
    env: Env = ()
    volumes: tuple[str, ...] = ()
    run_args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    pull: str = "if_not_present"
    archive: ArtifactRef | None = None
    timeout: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image, "ports": list(self.ports), "env": _env_dict(self.env), "volumes": list(self.volumes),
                               "run_args": list(self.run_args), "command": list(self.command), "pull": self.pull, "timeout": self.timeout}
        if self.name is not None:
            out["name"] = self.name
        if self.archive is not None:
            out["archive"] = self.archive.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> DockerAction:
        f = Fields(raw, "deploy.docker")
        image = f.text("image", max_len=512)
        if not image or image.startswith("-") or any(c.isspace() for c in image):
            raise DecodeError(f"deploy.docker: field 'image' is {image!r}; expected an image reference such as repo/app:1.2")
        pull = choice(f, "pull", PULL_POLICIES, "if_not_present")
        for key in ("ports", "volumes"):
            for item in _strings(f, key):
                if item.startswith("-"):
                    raise DecodeError(f"deploy.docker: field {key!r} has {item!r}; it must not start with '-'")
        return cls(image, _pattern(f, "name", _NAME, "a container name (letters, digits, '_', '.', '-')", optional=True),
                   _strings(f, "ports"), _env(f, "env"), _strings(f, "volumes"), _strings(f, "run_args"), _strings(f, "command"),
                   pull, _sub(f, "archive", lambda r: ArtifactRef.from_dict(r, "deploy.docker archive")), _seconds(f, "timeout", 600.0))

    def resolve(self, v: Vars) -> DockerAction:
        return attrs.evolve(self, image=v.apply(self.image), ports=v.apply_all(self.ports), env=v.apply_env(self.env),
                            volumes=v.apply_all(self.volumes), run_args=v.apply_all(self.run_args), command=v.apply_all(self.command))


@attrs.frozen
class RollbackAction:
    """Back to the release named by the command's `version`, or to the previous one when it has none."""

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> RollbackAction:
        Fields(raw, "deploy.rollback")
        return cls()

    def resolve(self, v: Vars) -> RollbackAction:
        return self


Action = ShellAction | TarAction | DockerAction | RollbackAction
_ACTIONS: dict[str, Callable[[dict[Any, Any]], Action]] = {
    SHELL: ShellAction.from_dict, TAR: TarAction.from_dict, DOCKER: DockerAction.from_dict, ROLLBACK: RollbackAction.from_dict}
_KIND_OF = {ShellAction: SHELL, TarAction: TAR, DockerAction: DOCKER, RollbackAction: ROLLBACK}


@attrs.frozen
class DeployCommand:
    deploy_id: str
    app: Application
    version: str | None  # the release to install; for deploy.rollback the release to return to (None: previous)
    root: str  # application root: releases live in <root>/releases/<project>/<name>/<env>/<version>
    action: Action
    issued_at_ns: int
    valid_until_ns: int
    health: HealthCheck | None = None
    service: Service | None = None
    keep_releases: int = 5
    targets: Targets = Targets(all=True)
    rollout: Rollout = Rollout()

    @property
    def kind(self) -> str:
        return _KIND_OF[type(self.action)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.kind, "deploy_id": self.deploy_id, "app": self.app.to_dict(), "root": self.root,
            "issued_at": timefmt.format_ns(self.issued_at_ns), "valid_until": timefmt.format_ns(self.valid_until_ns),
            "keep_releases": self.keep_releases, "targets": self.targets.to_dict(), "rollout": self.rollout.to_dict(),
            "params": self.action.to_dict()}
        if self.version is not None:
            out["version"] = self.version
        if self.health is not None:
            out["health"] = self.health.to_dict()
        if self.service is not None:
            out["service"] = self.service.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[Any, Any]) -> DeployCommand:
        f = Fields(raw, "deploy command")
        kind = choice(f, "type", KINDS)
        deploy_id = _req(f, "deploy_id", _DEPLOY_ID, "1-128 letters, digits, '_', '.', ':', '-'")
        version = _pattern(f, "version", _VERSION, "1-128 letters, digits, '_', '.', '+', '-' (not starting with '.')",
                           optional=kind == ROLLBACK)
        if version in RESERVED_VERSIONS:
            raise DecodeError(f"deploy command: field 'version' must not be {version!r} (reserved)")
        root = f.text("root", max_len=MAX_ITEM)
        if not root.startswith("/") or "\x00" in root or ".." in root.split("/"):
            raise DecodeError(f"deploy command: field 'root' is {root!r}; expected an absolute path without '..'")
        issued, until = _time(f, "issued_at"), _time(f, "valid_until")
        if not issued < until <= issued + MAX_WINDOW_NS:
            raise DecodeError("deploy command: 'valid_until' must be after 'issued_at' and at most 30 days later")
        app = _sub(f, "app", Application.from_dict, optional=False)
        action = _sub(f, "params", _ACTIONS[kind], optional=False)
        assert app is not None and action is not None
        return cls(deploy_id, app, version, root.rstrip("/") or "/", action, issued, until,
                   health=_sub(f, "health", HealthCheck.from_dict), service=_sub(f, "service", Service.from_dict),
                   keep_releases=_int(f, "keep_releases", 5, 1, MAX_KEEP_RELEASES),
                   targets=_sub(f, "targets", Targets.from_dict) or Targets(all=True),
                   rollout=_sub(f, "rollout", Rollout.from_dict) or Rollout())

    def to_bytes(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> DeployCommand:
        if len(data) > MAX_COMMAND_BYTES:
            raise DecodeError(f"deploy command is {len(data)} bytes; the limit is {MAX_COMMAND_BYTES}")
        return cls.from_dict(codec.decode_map(data, "deploy command"))

    def check_window(self, now_ns: int) -> None:
        """Refuse a command not yet or no longer valid at `now_ns` (checked when it is accepted)."""
        if self.issued_at_ns > now_ns + MAX_FUTURE_NS:
            raise DecodeError(f"deploy {self.deploy_id}: issued_at {timefmt.format_ns(self.issued_at_ns)} is in the future")
        if now_ns > self.valid_until_ns:
            raise DecodeError(f"deploy {self.deploy_id}: expired at {timefmt.format_ns(self.valid_until_ns)}")

    def resolve(self, v: Vars) -> DeployCommand:
        """This command with `${installPath}`, `${env}`, `${version}`, `${host}` substituted."""
        return attrs.evolve(self, action=self.action.resolve(v), health=None if self.health is None else self.health.resolve(v),
                            service=None if self.service is None else self.service.resolve(v))
