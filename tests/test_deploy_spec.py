"""Deploy command values: round trips, validation at the edge naming the field, limits, substitution."""

from __future__ import annotations

import string

import attrs
import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode import codec, timefmt
from p2pnode.deploy import config as deploy_config
from p2pnode.deploy.config import DeployConfig
from p2pnode.deploy.report import DeployReport
from p2pnode.deploy.spec import (
    MAX_ARTIFACT_SIZE, MAX_SCRIPT_BYTES, Application, ArtifactRef, DeployCommand, DockerAction, FileArtifact, HealthCheck, RollbackAction, Rollout,
    Service, ShellAction, TarAction, Targets, Vars,
)
from p2pnode.config import ConfigError
from p2pnode.errors import DecodeError
from p2pnode.identity import KeyPair

NOW = timefmt.parse_ns("2026-11-25T10:00:00Z")
HOUR = 3600 * timefmt.NS
PEER = str(KeyPair.from_seed(b"\x01" * 32).peer_id)

name = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=20).filter(lambda s: s[0].isalnum())
text = st.text(max_size=50).filter(lambda s: "\x00" not in s)
env = st.lists(st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True), text), max_size=4, unique_by=lambda kv: kv[0]).map(
    lambda kvs: tuple(sorted(kvs)))
seconds = st.floats(min_value=0.5, max_value=3600, allow_nan=False)
sha = st.text("0123456789abcdef", min_size=64, max_size=64)
ref = st.builds(ArtifactRef, sha, st.integers(0, MAX_ARTIFACT_SIZE))
health = st.one_of(
    st.builds(HealthCheck, st.just("http"), url=st.just("http://${host}:8080/health"), expect_status=st.integers(100, 599),
              body_contains=st.none() | text, timeout=seconds, retries=st.integers(0, 10), interval=seconds),
    st.builds(HealthCheck, st.just("tcp"), host=st.just("127.0.0.1"), port=st.integers(1, 65535)),
    st.builds(HealthCheck, st.just("script"), script=text))
service = st.one_of(st.builds(Service, st.just("systemd"), command=st.just("${installPath}/bin/app -env=${env}"), env=env),
                    st.builds(Service, st.just("scripts"), start=st.just("lightnode/start.sh"), stop=st.just("lightnode/stop.sh")))
action = st.one_of(
    st.builds(ShellAction, text, env=env, timeout=seconds, rollback_script=st.none() | text),
    st.builds(TarAction, ref, st.lists(st.builds(FileArtifact, ref, st.just("bin/fisco-bcos"), st.integers(0, 0o777)), max_size=2)
              .map(tuple), st.none() | text, env=env),
    st.builds(DockerAction, st.just("localhost/app:1"), name=st.none() | name, ports=st.lists(st.just("8080:80"), max_size=2).map(tuple),
              env=env, run_args=st.just(("--init", "--network", "host")), pull=st.sampled_from(["always", "if_not_present", "never"]),
              archive=st.none() | ref),
    st.just(RollbackAction()))


@st.composite
def commands(draw):
    act = draw(action)
    version = draw(name.filter(lambda v: v != "current"))
    if isinstance(act, RollbackAction):
        version = draw(st.none() | st.just(version))
    return DeployCommand(draw(name), Application(draw(name), draw(name), draw(name)), version, "/opt/apps", act, NOW, NOW + HOUR,
                         health=draw(st.none() | health), service=draw(st.none() | service), keep_releases=draw(st.integers(1, 100)),
                         targets=draw(st.just(Targets(all=True)) | st.just(Targets(labels=("web",))) | st.just(Targets(peers=(PEER,)))),
                         rollout=draw(st.builds(Rollout, st.integers(1, 10), st.integers(0, 3), st.booleans())))


@given(commands())
@settings(max_examples=200, suppress_health_check=[HypothesisHealthCheck.too_slow])
def test_round_trip(cmd):
    assert DeployCommand.from_bytes(cmd.to_bytes()) == cmd


cbor_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)


@given(st.dictionaries(st.sampled_from(["type", "deploy_id", "app", "version", "root", "issued_at", "valid_until", "params",
                                        "health", "service", "targets", "rollout", "keep_releases"]), cbor_values))
@settings(max_examples=300)
def test_arbitrary_maps_raise_only_decode_error(raw):
    try:
        DeployCommand.from_dict(raw)
    except DecodeError:
        pass


@given(commands(), st.sampled_from(["type", "deploy_id", "app", "version", "root", "issued_at", "params", "health", "service",
                                    "targets", "rollout", "keep_releases"]), cbor_values)
@settings(max_examples=300, suppress_health_check=[HypothesisHealthCheck.too_slow])
def test_mutated_field_is_decoded_or_refused(cmd, key, value):
    raw = cmd.to_dict()
    raw[key] = value
    try:
        DeployCommand.from_dict(raw)
    except DecodeError:
        pass


def base(**params) -> dict:
    cmd = DeployCommand("d-1", Application("shop", "api", "prod"), "1.0", "/opt/apps", ShellAction("echo hi"), NOW, NOW + HOUR)
    raw = cmd.to_dict()
    raw.update(params)
    return raw


@pytest.mark.parametrize("change, field", [
    ({"type": "deploy.ftp"}, "'type'"),
    ({"deploy_id": "../x"}, "'deploy_id'"),
    ({"version": "current"}, "'version'"),
    ({"version": "../../etc"}, "'version'"),
    ({"root": "relative/path"}, "'root'"),
    ({"root": "/opt/../etc"}, "'root'"),
    ({"app": {"project": "a/b", "name": "x", "env": "y"}}, "'project'"),
    ({"keep_releases": 0}, "'keep_releases'"),
    ({"valid_until": "2026-11-25T09:00:00Z"}, "'valid_until' must be after"),
    ({"issued_at": "yesterday"}, "'issued_at'"),
    ({"params": {"script": "x" * (MAX_SCRIPT_BYTES + 1)}}, "script size limit"),
    ({"params": {"script": "ok", "timeout": 0}}, "'timeout'"),
    ({"params": {"script": "ok", "timeout": True}}, "'timeout'"),
    ({"params": {"script": "ok", "env": {"BAD-NAME": "x"}}}, "invalid variable name"),
    ({"health": {"type": "http", "url": "ftp://x/"}}, "'url'"),
    ({"health": {"type": "tcp", "host": "h", "port": 70000}}, "'port'"),
    ({"health": {"type": "dns"}}, "'type'"),
    ({"service": {"type": "scripts", "start": "../start.sh"}}, "'start'"),
    ({"service": {"type": "systemd", "command": "a\nb"}}, "'command'"),
    ({"targets": {"peers": ["not-a-peer"]}}, "'peers'"),
    ({"targets": {"all": True, "labels": ["web"]}}, "'all' excludes"),
    ({"targets": {}}, "name peers, labels"),
    ({"rollout": {"max_parallel": 0}}, "'max_parallel'"),
])
def test_bad_fields_are_named(change, field):
    with pytest.raises(DecodeError) as info:
        DeployCommand.from_dict(base(**change))
    assert field in str(info.value)


def test_kind_specific_fields():
    tar = base(type="deploy.tar", params={"archive": {"sha256": "A" * 64, "size": 1}})
    with pytest.raises(DecodeError, match="'sha256'"):
        DeployCommand.from_dict(tar)
    tar["params"] = {"archive": {"sha256": "a" * 64, "size": 1}, "files": [{"sha256": "b" * 64, "size": 1, "path": "/etc/passwd"}]}
    with pytest.raises(DecodeError, match="relative path inside the release"):
        DeployCommand.from_dict(tar)
    docker = base(type="deploy.docker", params={"image": "--privileged"})
    with pytest.raises(DecodeError, match="'image'"):
        DeployCommand.from_dict(docker)
    docker["params"] = {"image": "app:1", "pull": "sometimes"}
    with pytest.raises(DecodeError, match="'pull'"):
        DeployCommand.from_dict(docker)
    docker["params"] = {"image": "app:1", "volumes": ["--rm"]}
    with pytest.raises(DecodeError, match="must not start with '-'"):
        DeployCommand.from_dict(docker)
    rollback = base(type="deploy.rollback", params={})
    del rollback["version"]
    assert DeployCommand.from_dict(rollback).version is None
    with pytest.raises(DecodeError, match="the limit is 524288"):
        DeployCommand.from_bytes(b"\xa0" + b"\x00" * (600 * 1024))


def test_window():
    cmd = DeployCommand.from_dict(base())
    cmd.check_window(NOW)
    with pytest.raises(DecodeError, match="expired"):
        cmd.check_window(NOW + 2 * HOUR)
    with pytest.raises(DecodeError, match="in the future"):
        cmd.check_window(NOW - HOUR)


def test_substitution_only_touches_the_four_variables():
    cmd = DeployCommand.from_dict(base(
        params={"script": 'cd ${installPath} && echo "${env}/${version}@${host} $HOME ${PATH} ${other}"', "env": {"DIR": "${installPath}/x"}},
        health={"type": "http", "url": "http://${host}:8080/health"},
        service={"type": "systemd", "command": "${installPath}/bin/app -env=${env}", "env": {"V": "${version}"}}))
    out = cmd.resolve(Vars("/opt/apps/releases/shop/api/prod/1.0", "prod", "1.0", "node7"))
    assert isinstance(out.action, ShellAction)
    assert out.action.script == 'cd /opt/apps/releases/shop/api/prod/1.0 && echo "prod/1.0@node7 $HOME ${PATH} ${other}"'
    assert out.action.env == (("DIR", "/opt/apps/releases/shop/api/prod/1.0/x"),)
    assert out.health is not None and out.health.url == "http://node7:8080/health"
    assert out.service is not None and out.service.command == "/opt/apps/releases/shop/api/prod/1.0/bin/app -env=prod"
    assert out.service.env == (("V", "1.0"),)
    assert out.deploy_id == cmd.deploy_id and out.version == "1.0"


def test_seed_defaults():
    h = HealthCheck.from_dict({"type": "tcp", "host": "${host}", "port": 8080})
    assert (h.timeout, h.retries, h.interval, h.min_healthy_time) == (60.0, 3, 10.0, 0.0)
    cmd = DeployCommand.from_dict(base())
    assert cmd.keep_releases == 5 and cmd.targets == Targets(all=True) and cmd.rollout == Rollout(1, 0, False)
    assert Application("shop", "api", "prod").unit_name == "shop-api-prod.service"


def test_report_round_trip_and_validation():
    r = DeployReport("d-1", "deploy.tar", "shop/api/prod", "1.0", "extracting", 45, "extracting", "", 4, NOW, False, None, "log")
    assert DeployReport.from_dict(codec.decode_map(codec.encode(r.to_dict()), "r")) == r
    bad = r.to_dict() | {"status": "exploded"}
    with pytest.raises(DecodeError, match="'status'"):
        DeployReport.from_dict(bad)


def test_node_config_section(tmp_path):
    cfg = deploy_config.parse({"allowed_roots": ["/opt/apps"], "docker_command": ["podman"], "env": {"CERT_DIR": "/etc/certs"}}, tmp_path)
    assert cfg.enabled and cfg.allowed_roots[0].as_posix() == "/opt/apps" and cfg.docker_command == ("podman",)
    assert cfg.artifact_dir == tmp_path / "artifacts" and cfg.env == (("CERT_DIR", "/etc/certs"),)
    assert not DeployConfig().enabled
    with pytest.raises(ConfigError, match="'deploy.allowed_roots'.*absolute"):
        deploy_config.parse({"allowed_roots": ["opt"]}, tmp_path)
    with pytest.raises(ConfigError, match="'deploy.frobnicate' is unknown"):
        deploy_config.parse({"frobnicate": 1}, tmp_path)
    with pytest.raises(ConfigError, match="'deploy.docker_command'"):
        deploy_config.parse({"docker_command": "podman"}, tmp_path)
    assert attrs.has(DeployConfig)
