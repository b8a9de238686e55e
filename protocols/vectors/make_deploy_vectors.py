"""Writes deploy.json: the deploy protocols' signed documents and request/reply frames, byte for byte.

Ed25519 signatures are deterministic, CBOR is encoded canonically and every key, time and byte is
fixed, so the bytes are reproducible (protocols/deploy.md). Run from the repository root:
    python protocols/vectors/make_deploy_vectors.py
"""

import hashlib
import json
from pathlib import Path

from p2pnode import codec, framing, timefmt
from p2pnode.cluster.documents import AdminProof
from p2pnode.deploy.documents import Manifest, NodeReport, Outcome, sign_command
from p2pnode.deploy.report import DeployReport
from p2pnode.deploy.spec import (
    Application, ArtifactRef, DeployCommand, HealthCheck, Rollout, Service, ShellAction, TarAction, Targets,
)
from p2pnode.identity import KeyPair

SEEDS = {"system": "11" * 32, "deployer": "55" * 32, "node_a": "33" * 32, "node_b": "44" * 32}
T0 = timefmt.parse_ns("2026-11-23T12:00:00.000000001Z")
CLUSTER = "demo"
ARTIFACT = b"p2pnode deploy vector artifact\n" * 3


def keys() -> dict[str, KeyPair]:
    return {name: KeyPair.from_seed(bytes.fromhex(seed)) for name, seed in SEEDS.items()}


def build() -> dict:
    k = keys()
    a, b = str(k["node_a"].peer_id), str(k["node_b"].peer_id)
    proof = AdminProof("deploy", CLUSTER, k["deployer"].peer_id, T0 - 3600 * timefmt.NS, T0 + 86400 * timefmt.NS,
                       T0 - 60 * timefmt.NS).sign(k["system"])
    app = Application("shop", "api", "prod")
    sha = hashlib.sha256(ARTIFACT).hexdigest()
    manifest = Manifest(sha, len(ARTIFACT), 64 * 1024, (hashlib.sha256(ARTIFACT).digest(),), T0, "api-1.4.2.tar.gz", k["node_a"].peer_id)
    manifest_env = manifest.sign(k["deployer"], proof, CLUSTER)
    health = HealthCheck("http", url="http://${host}:8080/health", body_contains="ok")
    tar = DeployCommand("api-1.4.2", app, "1.4.2", "/opt/apps", TarAction(ArtifactRef(sha, len(ARTIFACT)), install_script="./install.sh",
                        env=(("PORT", "8080"),)), T0, T0 + 3600 * timefmt.NS, health=health,
                        service=Service("systemd", command="${installPath}/bin/api --port 8080"), targets=Targets(peers=(a, b)),
                        rollout=Rollout(max_parallel=1, max_failures=0, auto_revert=True, progress_deadline=300.0))
    shell = DeployCommand("migrate-7", app, "7", "/opt/apps", ShellAction("./migrate.sh up", timeout=120.0, rollback_script="./migrate.sh down"),
                          T0, T0 + 600 * timefmt.NS, targets=Targets(peers=(b,)))
    tar_env = sign_command(tar, k["deployer"], proof, CLUSTER)
    shell_env = sign_command(shell, k["deployer"], proof, CLUSTER)
    running = NodeReport(k["node_a"].peer_id, CLUSTER, DeployReport("api-1.4.2", "deploy.tar", app.key, "1.4.2", "extracting", 45,
                                                                     "extracting", "", 6, T0 + 2 * timefmt.NS), T0 + timefmt.NS)
    done = NodeReport(k["node_a"].peer_id, CLUSTER, DeployReport("api-1.4.2", "deploy.tar", app.key, "1.4.2", "success", 100, "done",
                                                                 "release 1.4.2 is current; http 200 in 0.003 s (1.2 s)", 11,
                                                                 T0 + 3 * timefmt.NS, True, True, "== start\n"), T0 + timefmt.NS)
    reverted = NodeReport(k["node_a"].peer_id, CLUSTER, DeployReport("api-1.4.2", "deploy.tar", app.key, "1.4.1", "rolled_back", 100,
                                                                     "revert: rolled back", "rolled back to 1.4.1", 16, T0 + 9 * timefmt.NS,
                                                                     True, False), T0 + timefmt.NS,
                          Outcome("success", True, T0 + 3 * timefmt.NS))
    frames = {
        "upload_request_frame": {"manifest": manifest_env.to_dict()},
        "upload_send_frame": {"result": "send", "have": []},
        "upload_stored_frame": {"result": "stored", "sha256": sha, "received": len(ARTIFACT)},
        "upload_refused_frame": {"result": "refused", "code": "no_space",
                                 "reason": "artifact of 96 bytes exceeds this node's deploy.max_artifact_bytes (64)"},
        "query_status_frame": {"op": "status", "deploy_id": "api-1.4.2", "auth": proof.to_dict()},
        "query_members_frame": {"op": "members"},
        "query_log_frame": {"op": "log", "deploy_id": "api-1.4.2", "node": a},
    }
    return {
        "description": "p2pnode deploy vectors: hex of canonical CBOR; *_frame values include the uvarint length prefix",
        "seeds": SEEDS,
        "peer_ids": {name: str(key.peer_id) for name, key in k.items()},
        "clock": timefmt.format_ns(T0 + 10),
        "cluster_id": CLUSTER,
        "artifact": ARTIFACT.hex(),
        "deployer_proof": proof.to_bytes().hex(),
        "artifact_manifest": manifest_env.to_bytes().hex(),
        "deploy_command_tar": tar_env.to_bytes().hex(),
        "deploy_command_shell": shell_env.to_bytes().hex(),
        "deploy_report_running": running.sign(k["node_a"]).to_bytes().hex(),
        "deploy_report_success": done.sign(k["node_a"]).to_bytes().hex(),
        "deploy_report_reverted": reverted.sign(k["node_a"]).to_bytes().hex(),
        **{name: framing.encode(codec.encode(message)).hex() for name, message in frames.items()},
    }


def main() -> None:
    out = Path(__file__).with_name("deploy.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
