"""protocols/vectors/deploy.json: our encoder reproduces every byte, our verifier accepts the documents
from the bytes alone, and refuses them where the spec says it must."""

import json
import sys
from pathlib import Path

import pytest

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import Rejected, Trust, verify_snapshot
from p2pnode.deploy.documents import NodeReport, verify_command, verify_manifest, verify_report
from p2pnode.deploy.rollout import Plan
from p2pnode.envelope import Envelope
from p2pnode.identity import KeyPair

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
sys.path.insert(0, str(VECTORS))
import make_deploy_vectors  # noqa: E402

V = json.loads((VECTORS / "deploy.json").read_text())
KEYS = {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in V["seeds"].items()}
NOW = timefmt.parse_ns(V["clock"])
TRUST = Trust(V["cluster_id"], KEYS["system"].public_key)


def env(name: str) -> Envelope:
    return Envelope.from_bytes(bytes.fromhex(V[name]))


def test_file_matches_what_the_code_produces():
    assert make_deploy_vectors.build() == V


def test_commands_verify_and_give_their_waves():
    signed = verify_command(env("deploy_command_tar"), TRUST, NOW)
    cmd = signed.command
    assert (signed.role, str(signed.issuer)) == ("deploy", V["peer_ids"]["deployer"])
    assert cmd.kind == "deploy.tar" and cmd.app.key == "shop/api/prod" and cmd.rollout.auto_revert
    assert Plan.of(cmd, cmd.targets.peers).waves == ((V["peer_ids"]["node_a"],), (V["peer_ids"]["node_b"],))
    shell = verify_command(env("deploy_command_shell"), TRUST, NOW).command
    assert shell.action.rollback_script == "./migrate.sh down" and shell.rollout.max_parallel == 1
    with pytest.raises(Rejected) as info:  # an hour later the tar command has expired
        verify_command(env("deploy_command_tar"), TRUST, NOW + 3601 * timefmt.NS)
    assert info.value.code == "expired"
    assert verify_command(env("deploy_command_tar"), TRUST, NOW + 3601 * timefmt.NS, stored=True).command == cmd
    with pytest.raises(Rejected) as info:  # a cluster without a system key accepts no deploy at all
        verify_command(env("deploy_command_tar"), Trust(V["cluster_id"]), NOW)
    assert info.value.code == "no_system_key"


def test_a_deployer_proof_signs_no_snapshot():
    proof = env("deployer_proof")
    assert proof.signer == KEYS["system"].public_key and proof.verify()["role"] == "deploy"
    from p2pnode.cluster.documents import Snapshot

    snap = Snapshot(V["cluster_id"], NOW, KEYS["deployer"].peer_id, (), proof).sign(KEYS["deployer"])
    with pytest.raises(Rejected) as info:
        verify_snapshot(snap, TRUST, NOW)
    assert info.value.code == "proof_invalid"


def test_reports_and_manifest():
    running = verify_report(env("deploy_report_running"), V["cluster_id"], member=True)
    assert running.report.status == "extracting" and running.result is None and running.key.startswith("api-1.4.2/12D3KooW")
    done = verify_report(env("deploy_report_success"), V["cluster_id"], member=True)
    assert done.result.success and done.report.seq == 11
    reverted = verify_report(env("deploy_report_reverted"), V["cluster_id"], member=True)
    assert reverted.report.status == "rolled_back" and reverted.result == done.result  # judged on its first outcome
    with pytest.raises(Rejected):
        verify_report(env("deploy_report_success"), V["cluster_id"], member=False)
    manifest = verify_manifest(env("artifact_manifest"), TRUST, NOW)
    assert manifest.size == len(bytes.fromhex(V["artifact"])) and str(manifest.origin) == V["peer_ids"]["node_a"]
    assert isinstance(NodeReport.from_dict(env("deploy_report_success").verify()), NodeReport)


def test_frames_decode():
    for name in [k for k in V if k.endswith("_frame")]:
        message = framing.LengthPrefixedDecoder().feed(bytes.fromhex(V[name]))
        assert len(message) == 1 and isinstance(codec.decode_map(message[0], name), dict), name
    send = codec.decode_map(framing.LengthPrefixedDecoder().feed(bytes.fromhex(V["upload_send_frame"]))[0], "send")
    assert send == {"result": "send", "have": []}  # then the artifact's bytes follow raw: V["artifact"]
