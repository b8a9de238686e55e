"""The lightnode recipe (seed 000) as p2pnode deploy commands.

`publish()` puts the recipe's artifacts into an artifact directory by SHA-256 (what the network half
does across the mesh): `build_chain.sh` in a small tar.gz, and as single files the two binaries,
`config.genesis` and `nodes.json`. `deploy_command()` is the `deploy.tar` that builds the lightnode
(install.sh), manages it with `lightnode/start.sh` / `lightnode/stop.sh` and health-checks it
(health.sh); `rollback_command()` returns to the previous release.

Try it on one machine without the mesh:

    python examples/lightnode/recipe.py --artifacts /tmp/ln/artifacts --root /tmp/ln/apps --version 3.2.0 --out /tmp/ln/cmd.json
    echo '{"allowed_roots": ["/tmp/ln/apps"], "artifact_dir": "/tmp/ln/artifacts", "env": {"NODE_CERT_DIR": "/etc/p2pnode/certs"}}' > /tmp/ln/deploy.json
    python -m p2pnode.deploy.local --config /tmp/ln/deploy.json --journal /tmp/ln/deploy.db /tmp/ln/cmd.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

from p2pnode import timefmt
from p2pnode.deploy.spec import (
    Application, ArtifactRef, DeployCommand, FileArtifact, HealthCheck, RollbackAction, Service, TarAction,
)

HERE = Path(__file__).resolve().parent
APP = Application("fisco", "lightnode", "prod")
SERVICE = Service("scripts", start="lightnode/start.sh", stop="lightnode/stop.sh", timeout=30.0)


def _put(artifact_dir: Path, data: bytes) -> ArtifactRef:
    digest = hashlib.sha256(data).hexdigest()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    (artifact_dir / digest).write_bytes(data)
    return ArtifactRef(digest, len(data))


def _recipe_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = (HERE / "fake/build_chain.sh").read_bytes()
        info = tarfile.TarInfo("build_chain.sh")
        info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parts(version: str) -> tuple[bytes, list[tuple[bytes, str, int]]]:
    """This version's artifacts: the archive holding build_chain.sh, and (data, path in the release,
    mode) of each single file — the binaries, config.genesis and nodes.json."""
    def binary(name: str) -> bytes:
        return (HERE / "fake" / name).read_bytes().replace(b"@VERSION@", version.encode())

    files = [(binary("fisco-bcos"), "bin/fisco-bcos", 0o755), (binary("fisco-bcos-lightnode"), "fisco-bcos-lightnode", 0o755),
             ((HERE / "fake/config.genesis").read_bytes(), "config.genesis", 0o644),
             ((HERE / "fake/nodes.json").read_bytes(), "nodes.json", 0o644)]
    return _recipe_archive(), files


def action(archive: ArtifactRef, files: list[tuple[ArtifactRef, str, int]]) -> TarAction:
    """The deploy.tar params, given the artifacts as they were published (locally or into the mesh)."""
    return TarAction(archive, tuple(FileArtifact(ref, path, mode) for ref, path, mode in files),
                     install_script=(HERE / "install.sh").read_text(), install_timeout=300.0)


def publish(artifact_dir: Path, version: str) -> TarAction:
    """Put this version's artifacts in `artifact_dir`; returns the deploy.tar action that uses them."""
    archive, files = parts(version)
    return action(_put(artifact_dir, archive), [(_put(artifact_dir, data), path, mode) for data, path, mode in files])


def export(directory: Path, version: str) -> list[str]:
    """Write this version's artifacts and scripts to `directory` for `p2pnode-admin deploy tar`;
    returns the arguments that deploy them through the mesh."""
    directory.mkdir(parents=True, exist_ok=True)
    archive, files = parts(version)
    (directory / "recipe.tar.gz").write_bytes(archive)
    args = [str(directory / "recipe.tar.gz")]
    for data, path, mode in files:
        local = directory / path.replace("/", "_")
        local.write_bytes(data)
        args += ["--file", f"{local}:{path}:{mode:o}"]
    for name in ("install.sh", "health.sh"):
        (directory / name).write_text((HERE / name).read_text())
    return [*args, "--app", APP.key, "--version", version, "--install-script", str(directory / "install.sh"),
            "--start", SERVICE.start, "--stop", SERVICE.stop, "--health-script", str(directory / "health.sh")]


def health(**overrides: float) -> HealthCheck:
    return HealthCheck("script", script=(HERE / "health.sh").read_text(), **{"timeout": 30.0, "retries": 10, "interval": 1.0,
                                                                              **overrides})


def deploy_command(action: TarAction, *, version: str, root: str, deploy_id: str | None = None,
                   health_check: HealthCheck | None = None, valid_for_s: int = 3600) -> DeployCommand:
    now = timefmt.now_ns()
    return DeployCommand(deploy_id or f"lightnode-{version}", APP, version, root, action, now, now + valid_for_s * timefmt.NS,
                         health=health_check or health(), service=SERVICE)


def rollback_command(*, root: str, deploy_id: str, to_version: str | None = None, valid_for_s: int = 3600) -> DeployCommand:
    now = timefmt.now_ns()
    return DeployCommand(deploy_id, APP, to_version, root, RollbackAction(), now, now + valid_for_s * timefmt.NS)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a lightnode deploy command and publish its artifacts locally")
    parser.add_argument("--artifacts", type=Path, help="local artifact directory (for python -m p2pnode.deploy.local)")
    parser.add_argument("--root", required=True, help="application root (inside the node's deploy.allowed_roots)")
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rollback", action="store_true", help="write a deploy.rollback to the previous release instead")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="instead: write the artifacts and scripts to DIR and print the p2pnode-admin deploy tar arguments")
    args = parser.parse_args()
    if args.export:
        print(" ".join(["p2pnode-admin deploy tar", *export(args.export, args.version), "--root", args.root]))
        return
    if args.rollback:
        cmd = rollback_command(root=args.root, deploy_id=f"lightnode-rollback-{timefmt.now_ns()}")
    else:
        if args.artifacts is None or args.out is None:
            parser.error("--artifacts and --out are needed (or --export DIR)")
        cmd = deploy_command(publish(args.artifacts, args.version), version=args.version, root=args.root)
    if args.out is None:
        parser.error("--out is needed")
    args.out.write_text(json.dumps(cmd.to_dict(), indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
