"""Node configuration (`config.json` in the data dir): attrs values, normalised and validated.

A bad config raises ConfigError whose message names the field, the bad value and what is
allowed; the CLI prints that one line and exits with code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import DecodeError, P2PNodeError
from .fsutil import atomic_write
from .host.resources import Limits, LimitsError, parse_limits
from .identity import PublicKey
from .multiaddr import Multiaddr

if TYPE_CHECKING:
    from .deploy.config import DeployConfig

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4100", "/ip4/0.0.0.0/tcp/4100/ws")  # one port: TCP and WebSocket
NETWORK_MODES = ("public", "private", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_NAME = "config.json"


class ConfigError(P2PNodeError):
    pass


@attrs.frozen
class InitConnection:
    type: str  # "dns" | "multiaddr"
    value: str


@attrs.frozen
class SyncConfig:
    """`sync` section: where this node lets folder sync read and write, whatever an admin signs."""

    allowed_roots: tuple[Path, ...] = ()  # empty: this node takes part in no folder
    max_bytes_in_flight: int = 32 << 20  # per folder, while pulling blocks

    def to_json(self) -> dict[str, Any]:
        return {"allowed_roots": [str(p) for p in self.allowed_roots], "max_bytes_in_flight": self.max_bytes_in_flight}


def _no_deploys() -> DeployConfig:
    from .deploy.config import DeployConfig  # here: p2pnode.deploy.config imports this module

    return DeployConfig()


@attrs.frozen
class NodeConfig:
    data_dir: Path
    listen: tuple[Multiaddr, ...] = tuple(Multiaddr.parse(a) for a in DEFAULT_LISTEN)
    network_mode: str = "auto"
    init_connections: tuple[InitConnection, ...] = ()
    cluster_id: str = ""
    system_pubkey: str = ""
    key_file: Path | None = None
    dns_nameservers: tuple[str, ...] = ()
    heartbeat_interval: float = 30.0
    log_level: str = "info"
    public_status: bool = False
    sync: SyncConfig = SyncConfig()
    deploy: DeployConfig = attrs.field(factory=_no_deploys)  # `deploy` section: p2pnode/deploy/config.py
    limits: Limits = Limits()  # resource limits (p2pnode/host/resources.py); config.json keeps the changed ones

    @property
    def key_path(self) -> Path:
        return self.key_file if self.key_file is not None else self.data_dir / "node.key"

    def to_json(self) -> dict[str, Any]:
        return {
            "listen": [str(a) for a in self.listen],
            "network_mode": self.network_mode,
            "init_connections": [{"type": c.type, "value": c.value} for c in self.init_connections],
            "cluster_id": self.cluster_id,
            "system_pubkey": self.system_pubkey,
            "data_dir": str(self.data_dir),
            "key_file": str(self.key_path),
            "dns_nameservers": list(self.dns_nameservers),
            "heartbeat_interval": self.heartbeat_interval,
            "log_level": self.log_level,
            "public_status": self.public_status,
            "sync": self.sync.to_json(),
            "deploy": self.deploy.to_json(),
            "limits": self.limits.to_json(),
        }


def _fail(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field {field!r}: invalid value {value!r}; {allowed}")


def _hostport(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(field, value, "expected \"host:port\" or \"host\"")
    host, sep, port = value.rpartition(":") if value.count(":") == 1 or value.startswith("[") else ("", "", "")
    if sep and not (port.isdigit() and 0 < int(port) < 65536):
        raise _fail(field, value, "the port must be 1-65535")
    return value


def parse(raw: dict[str, Any], *, data_dir: Path) -> NodeConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    known = set(attrs.fields_dict(NodeConfig))
    for key in raw:
        if key not in known:
            raise ConfigError(f"config field {key!r} is unknown; allowed fields: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    if "listen" in raw:
        value = raw["listen"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail("listen", value, "expected a list of multiaddr strings")
        addrs = []
        for item in value:
            try:
                addr = Multiaddr.parse(item)
            except DecodeError as exc:
                raise _fail("listen", item, str(exc)) from None
            protos = addr.protocols()
            if protos[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or protos[2:] not in ([], ["ws"]):
                raise _fail("listen", item, "expected /ip4|ip6/<addr>/tcp/<port>[/ws]")
            addrs.append(addr)
        kw["listen"] = tuple(addrs)
    if "network_mode" in raw:
        if raw["network_mode"] not in NETWORK_MODES:
            raise _fail("network_mode", raw["network_mode"], f"allowed: {', '.join(NETWORK_MODES)}")
        kw["network_mode"] = raw["network_mode"]
    if "init_connections" in raw:
        value = raw["init_connections"]
        if not isinstance(value, list):
            raise _fail("init_connections", value, 'expected a list of {"type": "dns"|"multiaddr", "value": ...}')
        conns = []
        for i, item in enumerate(value):
            field = f"init_connections[{i}]"
            if not isinstance(item, dict) or set(item) != {"type", "value"} or not isinstance(item["value"], str):
                raise _fail(field, item, 'expected {"type": "dns"|"multiaddr", "value": "<text>"}')
            if item["type"] == "multiaddr":
                try:
                    Multiaddr.parse(item["value"])
                except DecodeError as exc:
                    raise _fail(field + ".value", item["value"], str(exc)) from None
            elif item["type"] == "dns":
                if not item["value"] or "/" in item["value"] or " " in item["value"]:
                    raise _fail(field + ".value", item["value"], "expected a domain name such as cluster.example.com")
            else:
                raise _fail(field + ".type", item["type"], "allowed: dns, multiaddr")
            conns.append(InitConnection(item["type"], item["value"]))
        kw["init_connections"] = tuple(conns)
    for name in ("cluster_id", "system_pubkey"):
        if name in raw:
            if not isinstance(raw[name], str):
                raise _fail(name, raw[name], "expected a string")
            kw[name] = raw[name].strip()
    if kw.get("system_pubkey"):
        try:
            PublicKey.from_id_text(kw["system_pubkey"])
        except DecodeError as exc:
            raise _fail("system_pubkey", kw["system_pubkey"], f"expected an Ed25519 key as a 12D3KooW… ID ({exc})") from None
    if "data_dir" in raw:
        if not isinstance(raw["data_dir"], str) or not raw["data_dir"]:
            raise _fail("data_dir", raw["data_dir"], "expected a directory path")
        data_dir = Path(raw["data_dir"])
    if "key_file" in raw:
        if not isinstance(raw["key_file"], str) or not raw["key_file"]:
            raise _fail("key_file", raw["key_file"], "expected a file path")
        kw["key_file"] = Path(raw["key_file"])
    if "dns_nameservers" in raw:
        value = raw["dns_nameservers"]
        if not isinstance(value, list):
            raise _fail("dns_nameservers", value, 'expected a list such as ["127.0.0.1:5353"]')
        kw["dns_nameservers"] = tuple(_hostport("dns_nameservers", v) for v in value)
    if "heartbeat_interval" in raw:
        value = raw["heartbeat_interval"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 3600:
            raise _fail("heartbeat_interval", value, "expected seconds between 0.1 and 3600")
        kw["heartbeat_interval"] = float(value)
    if "log_level" in raw:
        if raw["log_level"] not in LOG_LEVELS:
            raise _fail("log_level", raw["log_level"], f"allowed: {', '.join(LOG_LEVELS)}")
        kw["log_level"] = raw["log_level"]
    if "public_status" in raw:
        if not isinstance(raw["public_status"], bool):
            raise _fail("public_status", raw["public_status"], "expected true or false")
        kw["public_status"] = raw["public_status"]
    if "sync" in raw:
        kw["sync"] = _sync_section(raw["sync"])
    if "deploy" in raw:
        from .deploy import config as deploy_config

        kw["deploy"] = deploy_config.parse(raw["deploy"], data_dir)
    if "limits" in raw:
        try:
            kw["limits"] = parse_limits(raw["limits"])
        except LimitsError as exc:
            raise ConfigError(str(exc)) from None
    return NodeConfig(data_dir=data_dir, **kw)


def _roots(field: str, value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise _fail(field, value, 'expected a list of absolute directory paths such as ["/srv"]')
    return tuple(Path(os.path.normpath(v)) for v in value)


def _sync_section(raw: Any) -> SyncConfig:
    if not isinstance(raw, dict):
        raise _fail("sync", raw, 'expected an object such as {"allowed_roots": ["/srv"]}')
    known = set(attrs.fields_dict(SyncConfig))
    for key in raw:
        if key not in known:
            raise ConfigError(f"config field 'sync.{key}' is unknown; allowed fields: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    if "allowed_roots" in raw:
        kw["allowed_roots"] = _roots("sync.allowed_roots", raw["allowed_roots"])
    if "max_bytes_in_flight" in raw:
        value = raw["max_bytes_in_flight"]
        if isinstance(value, bool) or not isinstance(value, int) or not (1 << 20) <= value <= (1 << 30):
            raise _fail("sync.max_bytes_in_flight", value, "expected bytes between 1048576 and 1073741824")
        kw["max_bytes_in_flight"] = value
    return SyncConfig(**kw)


def load_or_create(data_dir: str | os.PathLike) -> tuple[NodeConfig, bool]:
    """Read `<data_dir>/config.json`, writing the default one first if there is none."""
    data_dir = Path(data_dir)
    path = data_dir / CONFIG_NAME
    if not path.exists():
        config = NodeConfig(data_dir=data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, (json.dumps(config.to_json(), indent=2) + "\n").encode(), mode=0o600)
        return config, True
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    return parse(raw, data_dir=data_dir), False
