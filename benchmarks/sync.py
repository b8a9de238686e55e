"""Folder sync benchmark: each figure side by side with the tool users would pick instead, in one run.

(a) Initial sync of a 1 GiB tree (one 512 MiB file + 10,000 files of 1-64 KiB) from a source node to
    one receiver node, against `rsync -a` over ssh on loopback: both throughputs and the ratio
    (target >= 0.8x rsync). Timed from the moment the admin-signed folder document is pushed to the
    source (so the source's scan is included, as rsync's file list and checksums are) until the
    receiver reports SUCCESS at the source's version and its tree is complete on disk.
(b) 1 % of the large file changed in place (one contiguous range, not block-aligned), then
    `POST /sync/trigger`: the bytes on the wire (TCP payload both ways on the receiver's sockets, from
    the kernel's tcp_info) as a share of the file's size (target <= 2 %), beside `rsync --stats`
    (total bytes sent + received) for the same change.
(c) One source and 8 receivers (max_parallel_nodes 8), 256 MiB: bytes the source uploads / data size
    (target <= 2.0; a star would be 8.0), from the block exchange counters in the source's status
    (`blocks.peers[*].bytes_out`), cross-checked with the TCP bytes the source process sent
    (everything: blocks, index chunks, signed states, heartbeats, Noise and yamux framing).
(d) Scan speed cold (MiB/s hashed, for 1-4 hash workers; the tree's pages are dropped with
    posix_fadvise DONTNEED first) and warm; the initial scan and rescans of 100,000 unchanged
    small files (target < 3 s).
(e) Memory: a process holding the 100,000-file index in sync.db rescans it and pages through it as
    index chunks (what a source serves); a receiver process accepts those chunks and plans a full
    sync (target < 150 MiB peak RSS).

Parts a-c run every node as a real `p2pnode run` process (own data dir and config.json: a loopback
port, cluster_id, system_pubkey, sync.allowed_roots), made members by an admin-signed snapshot
pushed over the control socket, which also takes the signed folder document (`POST /push`) and
answers `GET /sync/status`. The benchmark starts its own sshd on a loopback port, with a temporary
host key and authorized key; it stops every process it started, also on Ctrl-C or failure.
Needs (Debian):

    apt-get install -y rsync openssh-server        # the baselines of parts a and b
    pip install py-spy                             # only for --profile

    python benchmarks/sync.py                      # every part, full size (~3 min on 2 quiet cores)
    python benchmarks/sync.py --quick              # every part, small sizes (~1 min)
    python benchmarks/sync.py --parts a,b          # some parts
    python benchmarks/sync.py --parts a --profile /tmp/prof   # py-spy the source and receiver

Page cache and filesystem (DESIGN.md): this machine's filesystem slows file creation for minutes
after many deletions, and the VM drops page cache untouched for about a minute. So every run writes
into fresh directories under --dir, deletes them only after all timings, and reads the source tree
just before each timed run (for rsync and for p2pnode alike). Files changed less than 0.5 s before
they are read are hashed twice by design (the scanner's "racy" rule), so new trees age a second
before they are timed. The machine is shared: the table shows the load average during each run.
"""

from __future__ import annotations

import abc
import argparse
import functools
import getpass
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from procstat import rss_kib

from p2pnode import timefmt
from p2pnode.cluster.documents import AdminProof, Member, Snapshot
from p2pnode.envelope import Envelope
from p2pnode.identity import KeyPair, save_key
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform.db import Database
from p2pnode.sync.blocks import Hasher
from p2pnode.sync.documents import FolderDoc
from p2pnode.sync.index_db import MIGRATIONS, IndexRepo
from p2pnode.sync.model import FolderConfig, NodeTarget
from p2pnode.sync.scanner import Scanner

MiB = 1024 * 1024
SOURCE = KeyPair.generate().peer_id


class Row(NamedTuple):
    measure: str
    value: str
    baseline: str = ""  # the same figure for the tool users would pick instead
    ratio: str = ""
    target: str = ""
    verdict: str = ""  # PASS / FAIL against the target
    notes: str = ""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def folder_config(root: Path, receiver_target: Path | None = None) -> FolderConfig:
    nodes = (NodeTarget(KeyPair.generate().peer_id, str(receiver_target)),) if receiver_target else ()
    return FolderConfig("bench", SOURCE, str(root), nodes, 1)


# -- trees ------------------------------------------------------------------------------------------------


def make_mixed_tree(root: Path, big_mib: int, small_files: int) -> int:
    """One large random file and `small_files` files of 1-64 KiB in 100 directories; returns bytes."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    total = 0
    with open(root / "large.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    total += big_mib * MiB
    for i in range(small_files):
        d = root / f"dir{i % 100:02d}"
        d.mkdir(exist_ok=True)
        size = rng.randint(1024, 64 * 1024)
        (d / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))
        total += size
    return total


def make_many_files(root: Path, count: int) -> None:
    """`count` files of 0-2 KiB, 100 to a directory, two levels deep (like a source tree)."""
    rng = random.Random(11)
    for i in range(count):
        d = root / f"pkg{i // 1000:03d}" / f"mod{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i % 100:03d}.txt").write_bytes(rng.randbytes(rng.randint(0, 2048)))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def drop_cache(root: Path) -> None:
    """Evict the tree's file pages: they are clean (os.sync after the tree was made), so DONTNEED drops them.
    The VM's disk may still be cached by its host: "cold" here is the guest's page cache only."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(4 * MiB):
                    pass


async def scan_once(root: Path, db_path: Path, workers: int) -> tuple[float, int, int]:
    db = await Database.open(db_path, MIGRATIONS)
    try:
        scanner = Scanner(db, IndexRepo(), folder_config(root), hasher=Hasher(workers))
        t0 = time.perf_counter()
        report = await scanner.full_scan()
        return time.perf_counter() - t0, report.bytes_hashed, report.files_hashed
    finally:
        await db.close()


# -- parts a-c: real nodes, rsync over ssh ------------------------------------------------------------------

HEARTBEAT = 5.0  # seconds; the production default is 30
STOP_TIMEOUT = 15.0
T = TypeVar("T", bound="Started")
NODE_CONFIG: dict[str, Any] = {}  # --node-config: more config.json fields for every node
def free_tcp_port() -> int:
    # Imported here: clusterkit brings the whole node, which would count in part (e)'s children.
    from clusterkit import free_tcp_port  # type: ignore[import-not-found]

    return int(free_tcp_port())


def control(sock: Path, method: str, target: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request to a node's control socket (HTTP/1.1 + JSON on a Unix socket; the node closes after it)."""
    data = json.dumps(body).encode() if body is not None else b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(f"{method} {target} HTTP/1.1\r\nhost: p2pnode\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(data)}\r\n\r\n".encode() + data)
        reply = bytearray()
        while chunk := s.recv(1 << 16):
            reply += chunk
    head, _, payload = bytes(reply).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload or b"{}")


class Started(abc.ABC):
    """A context manager for processes: start() on entry, stop() on exit, and stop() also when
    start() fails half-way or is interrupted (Ctrl-C), so nothing it started is left running."""

    def __enter__(self: T) -> T:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class NodeProc:
    """One `p2pnode run` process with its own data dir, config.json and key; stdout and stderr in node.log."""

    def __init__(self, root: Path, name: str, cluster_id: str, system_pubkey: str, allowed_root: Path, extra: dict[str, Any]):
        self.name = name
        self.key = KeyPair.generate()
        self.port = free_tcp_port()
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True, mode=0o700)
        save_key(self.data_dir / "node.key", self.key)
        config: dict[str, Any] = {"listen": [f"/ip4/127.0.0.1/tcp/{self.port}"], "cluster_id": cluster_id, "system_pubkey": system_pubkey,
                  "heartbeat_interval": HEARTBEAT, "log_level": "info", "sync": {"allowed_roots": [str(allowed_root)]}}
        for key, value in extra.items():  # --node-config: merged one level deep
            config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
        (self.data_dir / "config.json").write_text(json.dumps(config, indent=2))
        self.log_path = self.data_dir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.data_dir / "control.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def member(self) -> Member:
        return Member(self.key.peer_id, self.name, (Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{self.port}"),))

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            # A session of its own: Ctrl-C reaches only the benchmark, which then stops the node cleanly.
            self.proc = subprocess.Popen([sys.executable, "-m", "p2pnode", "run", "--data-dir", str(self.data_dir)],
                                         stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n  " + "\n  ".join(tail))

    def get(self, target: str) -> Any:
        status, body = control(self.sock, "GET", target)
        if status != 200:
            raise RuntimeError(f"{self.name}: GET {target} -> {status} {body}")
        return body

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    """Signal a child (if it still runs) and wait for it; SIGKILL if it takes longer than `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, alive: Sequence[NodeProc] = (),
               every: float = 0.2, tick: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for n in alive:
            n.check_alive()
        result = predicate()
        if result:
            return result
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Cluster(Started):
    """Nodes as real processes on loopback, made members by an admin-signed snapshot pushed to one of them."""

    def __init__(self, root: Path, names: Sequence[str], allowed_root: Path):
        self.cluster_id = "sync-bench"
        self.system = KeyPair.generate()
        self.admin = KeyPair.generate()
        self.nodes = [NodeProc(root, n, self.cluster_id, str(self.system.peer_id), allowed_root, NODE_CONFIG) for n in names]

    def start(self) -> None:
        for n in self.nodes:
            n.start()
        wait_until(lambda: all(n.sock.exists() for n in self.nodes), 60, "control sockets", self.nodes)
        members = tuple(n.member() for n in self.nodes)
        snap = Snapshot(self.cluster_id, timefmt.now_ns(), self.admin.peer_id, members, self.proof()).sign(self.admin)
        self.push(self.nodes[0], snap)
        want = len(self.nodes) - 1

        def meshed() -> bool:
            views = [n.get("/status") for n in self.nodes]
            return all(v.get("state") == "healthy" and len(v.get("online_members", ())) == want for v in views)

        wait_until(meshed, 120, "every node healthy and connected to every other", self.nodes, every=0.5)

    def stop(self) -> None:
        for n in self.nodes:  # SIGTERM to all first: they stop in parallel
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            stop_process(n.proc)

    def proof(self) -> Envelope:
        now = timefmt.now_ns()
        day = 24 * 3600 * timefmt.NS
        return AdminProof("admin", self.cluster_id, self.admin.peer_id, now - day, now + day, now).sign(self.system)

    def push(self, node: NodeProc, env: Envelope) -> None:
        status, verdict = control(node.sock, "POST", "/push", {"envelope": env.to_bytes().hex()})
        if status != 200 or verdict.get("result") != "accepted":
            raise RuntimeError(f"{node.name} did not accept {env.type}: {status} {verdict}")

    def declare(self, folder_id: str, source: NodeProc, source_path: Path, receivers: Sequence[tuple[NodeProc, Path]],
                max_parallel_nodes: int) -> None:
        now = timefmt.now_ns()
        config = FolderConfig(folder_id, source.key.peer_id, str(source_path),
                              tuple(NodeTarget(r.key.peer_id, str(p)) for r, p in receivers), now, max_parallel_nodes)
        self.push(source, FolderDoc(folder_id, now, config).sign(self.admin, self.proof(), self.cluster_id))

    def folder(self, node: NodeProc, folder_id: str) -> dict[str, Any]:
        return node.get(f"/sync/status?folder={folder_id}")["folders"][0]

    def wait_in_sync(self, folder_id: str, source: NodeProc, done: Callable[[], bool], *, after_seq: int = 0,
                     timeout: float = 1800, tick: Callable[[], None] | None = None) -> dict[str, Any]:
        """Until every receiver reports SUCCESS at the source's version (newer than `after_seq`), as the
        source's /sync/status shows, and `done()` (the receivers' trees on disk are complete: a scan still
        running could publish another version). Prints progress to stderr every few seconds."""
        last_print = [time.monotonic()]
        view: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal view
            view = self.folder(source, folder_id)
            version = view.get("version")
            if version is None or version["seq"] <= after_seq:
                return False
            return all(n.get("state") == "in-sync" for n in view["nodes"]) and done()

        def progress() -> None:
            if tick is not None:
                tick()
            if time.monotonic() - last_print[0] >= 5:
                last_print[0] = time.monotonic()
                parts = []
                for n in view.get("nodes", ()):
                    task = n.get("task") or {}
                    parts.append(f"{n.get('name')} {n.get('status')} {task.get('bytes_done', 0) / MiB:.0f}/"
                                 f"{task.get('bytes_total', 0) / MiB:.0f} MiB")
                print(f"    ... {', '.join(parts) or 'waiting for the source'}  (load {loadavg()})", file=sys.stderr)

        wait_until(ok, timeout, f"folder {folder_id} in sync", self.nodes, tick=progress)
        return view


def block_bytes(node: NodeProc, direction: str) -> int:
    """The block exchange's counters in the node's status: bytes sent (bytes_out) or received (bytes_in), all peers."""
    peers = node.get("/status")["blocks"]["peers"]
    return sum(p[direction] for p in peers.values())


class SocketBytes:
    """TCP payload bytes a process sent and received, from the kernel's tcp_info (`ss -ti`): sampled while
    a run goes on, per socket (a connection that closes keeps its last sample), as a delta from `start()`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.base: dict[str, tuple[int, int]] = {}
        self.last: dict[str, tuple[int, int]] = {}

    def _inodes(self) -> set[str]:
        out = set()
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
        return out

    def _read(self) -> dict[str, tuple[int, int]]:
        inodes = self._inodes()
        text = subprocess.run(["ss", "-tinHe"], capture_output=True, text=True, check=True).stdout
        found: dict[str, tuple[int, int]] = {}
        key = None
        for line in text.splitlines():
            if not line[:1].isspace():
                ino = re.search(r"\bino:(\d+)", line)
                fields = line.split()
                key = f"{fields[3]}>{fields[4]}" if ino and ino.group(1) in inodes else None
            elif key is not None:
                sent = re.search(r"\bbytes_sent:(\d+)", line)
                received = re.search(r"\bbytes_received:(\d+)", line)
                found[key] = (int(sent.group(1)) if sent else 0, int(received.group(1)) if received else 0)
        return found

    def start(self) -> None:
        self.base = self._read()
        self.last = dict(self.base)

    def sample(self) -> None:
        self.last.update(self._read())

    def totals(self) -> tuple[int, int]:
        """(sent, received) since start()."""
        sent = received = 0
        for key, (s, r) in self.last.items():
            s0, r0 = self.base.get(key, (0, 0))
            sent += s - s0
            received += r - r0
        return sent, received


class Sshd(Started):
    """sshd on a loopback port with a temporary host key and one authorized key, for rsync over ssh."""

    def __init__(self, root: Path):
        self.dir = root
        self.dir.mkdir(parents=True, mode=0o700)
        self.port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd) or not shutil.which("rsync"):
            raise RuntimeError("parts a and b need rsync and sshd: apt-get install -y rsync openssh-server")
        d = self.dir
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nLogLevel ERROR\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        with open(d / "sshd.log", "ab") as log_file:
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=log_file, start_new_session=True)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(d / 'sshd.log').read_text()[-500:]}")
            return subprocess.run([*self.ssh_argv(), f"{getpass.getuser()}@127.0.0.1", "true"], capture_output=True).returncode == 0

        wait_until(answers, 30, "sshd to accept the key", every=0.3)

    def stop(self) -> None:
        stop_process(self.proc)

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.dir / "client_key"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def rsync(self, src: Path, dst: Path) -> tuple[float, int, int]:
        """`rsync -a --stats src/ host:dst/` over this sshd; (seconds, bytes sent, bytes received) as rsync counts them."""
        t0 = time.perf_counter()
        done = subprocess.run(["rsync", "-a", "--stats", "-e", shlex.join(self.ssh_argv()), f"{src}/",
                               f"{getpass.getuser()}@127.0.0.1:{dst}/"], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"rsync failed ({done.returncode}): {done.stderr[-1000:]}")

        def figure(label: str) -> int:
            m = re.search(rf"^{label}: ([\d,]+)", done.stdout, re.M)
            if m is None:
                raise RuntimeError(f"no {label!r} in rsync --stats:\n{done.stdout}")
            return int(m.group(1).replace(",", ""))

        return seconds, figure("Total bytes sent"), figure("Total bytes received")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tree_complete(root: Path, files: int, total: int) -> bool:
    """`files` regular files holding `total` bytes, and no temporary files left."""
    count = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith(".p2psync."):
                return False
            count += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return count == files and size == total


def same_tree(a: Path, b: Path, *, mtimes: bool) -> int:
    """Compare two trees' regular files (content, and mtime to the ns if asked); returns files compared."""
    count = 0
    for dirpath, _, names in os.walk(a):
        rel = os.path.relpath(dirpath, a)
        for name in names:
            pa, pb = os.path.join(dirpath, name), os.path.join(b, rel, name)
            sa, sb = os.lstat(pa), os.lstat(pb)
            if sa.st_size != sb.st_size or (mtimes and sa.st_mtime_ns != sb.st_mtime_ns):
                raise AssertionError(f"{pb}: size/mtime {sb.st_size}/{sb.st_mtime_ns}, expected {sa.st_size}/{sa.st_mtime_ns}")
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                while True:
                    x, y = fa.read(4 * MiB), fb.read(4 * MiB)
                    if x != y:
                        raise AssertionError(f"{pb}: content differs")
                    if not x:
                        break
            count += 1
    return count


class Profiler:
    """py-spy (sampling, non-blocking) attached to some nodes for a timed window, when --profile names a directory."""

    def __init__(self, out_dir: Path | None, label: str, nodes: Sequence[NodeProc]):
        self.out_dir, self.label, self.nodes = out_dir, label, nodes
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        if self.out_dir is None:
            return self
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            out = self.out_dir / f"{self.label}-{n.name}.txt"
            with open(self.out_dir / f"{self.label}-{n.name}.log", "wb") as log_file:
                self.procs.append(subprocess.Popen([spy, "record", "--pid", str(n.pid), "--rate", "97", "--nonblocking", "--format", "raw",
                                                    "--output", str(out)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                                   start_new_session=True))
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            stop_process(p, signal.SIGINT, 30)  # py-spy writes its output on SIGINT
        if self.out_dir is not None:
            for n in self.nodes:
                path = self.out_dir / f"{self.label}-{n.name}.txt"
                if path.exists():
                    print(profile_summary(path), file=sys.stderr)


IDLE_FRAMES = ("EpollIOManager.get_events", "WorkerThread._work (_thread_cache.py:211)", "Condition.wait", "Thread.join",
               "Event.wait", "_wait_for_tstate_lock")


PLUMBING_FRAMES = ("main (cli.py", "_run_code (", "<module> (", "run (_run.py", "unrolled_run (", "Thread.run (", "Thread._bootstrap",
                   "WorkerThread._", "capture (_impl", "to_thread_run_sync.<locals>.worker_fn", "_run (cli.py", "open_nursery_unwrapped",
                   "_run_locked (cli.py", "Node.run (", "Runner.", "run_sync_soon", "ServiceRunner")


def profile_summary(path: Path, top: int = 14) -> str:
    """The functions holding the most busy samples (py-spy raw = collapsed stacks), by self and by total
    time; samples whose innermost frame is a thread or the event loop waiting are counted as idle."""
    self_time: dict[str, int] = {}
    total_time: dict[str, int] = {}
    samples = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r" \(([^)]*/)?([^)/]+)\)$", r" (\2)", f) for f in stack.split(";")[1:]]  # drop the thread frame
        if not frames or frames[-1].startswith(IDLE_FRAMES):
            idle += count
            continue
        samples += count
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + count
        for f in set(frames):
            if not f.startswith(PLUMBING_FRAMES):
                total_time[f] = total_time.get(f, 0) + count
    lines = [f"profile {path.name}: {samples} busy samples, {idle} idle (per thread)"]
    for title, table in (("self", self_time), ("total", total_time)):
        lines.append(f"  by {title}:")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * count / max(1, samples):5.1f} %  {frame[:130]}")
    return "\n".join(lines)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def part_ab(base: Path, big_mib: int, small_files: int, parts: str, profile: Path | None) -> list[Row]:
    rows: list[Row] = []
    tree = base / "ab-src"
    total = make_mixed_tree(tree, big_mib, small_files)
    files = small_files + 1
    dst, rs_dst = base / "ab-p2p", base / "ab-rsync"
    os.sync()
    time.sleep(1.0)  # past the scanner's racy window
    with Sshd(base / "ssh") as sshd, Cluster(base / "ab-nodes", ["src", "r1"], allowed_root=base) as cl:
        src, r1 = cl.nodes
        print(f"  (a) rsync -a over ssh, {mib(total)} in {files} files ...", file=sys.stderr)
        read_all(tree)
        rs_seconds, rs_sent, rs_received = sshd.rsync(tree, rs_dst)
        rs_load = loadavg()
        os.sync()  # rsync's writes reach the disk before the next run starts

        print("  (a) p2pnode: folder declared on the source ...", file=sys.stderr)
        read_all(tree)
        wire = SocketBytes(r1.pid)
        wire.start()
        cpu0 = [cpu_seconds(n.pid) for n in (src, r1)]
        with Profiler(profile, "a", [src, r1]):
            t0 = time.perf_counter()
            cl.declare("bench", src, tree, [(r1, dst)], 1)
            view = cl.wait_in_sync("bench", src, lambda: tree_complete(dst, files, total), tick=wire.sample)
            seconds = time.perf_counter() - t0
        load = loadavg()
        cpu = [cpu_seconds(n.pid) - c for n, c in zip((src, r1), cpu0)]
        wire.sample()
        sent, received = wire.totals()
        same_tree(tree, dst, mtimes=True)
        same_tree(tree, rs_dst, mtimes=False)
        ours, theirs = total / MiB / seconds, total / MiB / rs_seconds
        rows.append(Row(f"a  initial sync, {mib(total)} in {files:,} files, 1 receiver", f"{ours:.0f} MiB/s", f"{theirs:.0f} MiB/s",
                        f"{ours / theirs:.2f}x", ">= 0.8x rsync", verdict(ours / theirs >= 0.8),
                        f"{seconds:.1f} s vs rsync {rs_seconds:.1f} s; CPU source {cpu[0]:.1f} s, receiver {cpu[1]:.1f} s; "
                        f"fsync per file (rsync: none); load {load} / {rs_load}"))
        rows.append(Row("a  ... bytes on the wire / data", f"{(sent + received) / total:.3f}", f"{(rs_sent + rs_received) / total:.3f}",
                        notes="p2pnode: TCP payload at the receiver (tcp_info); rsync: --stats, before ssh's framing"))

        if "b" in parts:
            big = tree / "large.bin"
            size = big.stat().st_size
            change = size // 100
            offset = size * 3 // 7 + 12345  # not block-aligned: the change touches one block more than it fills
            write_at(big, offset, os.urandom(change))
            read_all(tree)
            seq = view["version"]["seq"]
            before_in = block_bytes(r1, "bytes_in")
            wire.start()
            print(f"  (b) p2pnode: {mib(change)} changed at offset {offset}, trigger ...", file=sys.stderr)
            t0 = time.perf_counter()
            status, answer = control(src.sock, "POST", "/sync/trigger", {"folder": "bench"}, timeout=600)
            if status != 200:
                raise RuntimeError(f"trigger: {status} {answer}")
            cl.wait_in_sync("bench", src, lambda: True, after_seq=seq, tick=wire.sample)
            b_seconds = time.perf_counter() - t0
            wire.sample()
            sent, received = wire.totals()
            moved = sent + received
            payload = block_bytes(r1, "bytes_in") - before_in
            print("  (b) rsync --stats ...", file=sys.stderr)
            read_all(tree)
            rb_seconds, rb_sent, rb_received = sshd.rsync(tree, rs_dst)
            same_tree(tree, dst, mtimes=True)
            same_tree(tree, rs_dst, mtimes=False)
            theirs_b = rb_sent + rb_received
            rows.append(Row(f"b  1 % of the {mib(size)} file changed: wire / file size", f"{100 * moved / size:.2f} %",
                            f"{100 * theirs_b / size:.2f} %", f"{moved / theirs_b:.2f}x", "<= 2 %", verdict(moved <= 0.02 * size),
                            f"{mib(moved)} (blocks {mib(payload)}); rsync {mib(theirs_b)}; {b_seconds:.1f} s vs rsync {rb_seconds:.1f} s"))
    return rows


def part_c(base: Path, data_mib: int, receivers: int, profile: Path | None) -> list[Row]:
    tree = base / "c-src"
    small_files = data_mib * 4  # ~32.5 KiB each: an eighth of the data in small files
    total = make_mixed_tree(tree, data_mib * 7 // 8, small_files)
    files = small_files + 1
    os.sync()
    time.sleep(1.0)
    names = ["src"] + [f"r{i}" for i in range(1, receivers + 1)]
    with Cluster(base / "c-nodes", names, allowed_root=base) as cl:
        src, rcv = cl.nodes[0], cl.nodes[1:]
        targets = [(r, base / f"c-{r.name}") for r in rcv]
        read_all(tree)
        wire = SocketBytes(src.pid)
        wire.start()
        out0 = block_bytes(src, "bytes_out")
        print(f"  (c) p2pnode: {mib(total)} to {receivers} receivers at once ...", file=sys.stderr)
        with Profiler(profile, "c", [src, rcv[0]]):
            t0 = time.perf_counter()
            cl.declare("fan", src, tree, targets, receivers)
            cl.wait_in_sync("fan", src, lambda: all(tree_complete(p, files, total) for _, p in targets), tick=wire.sample)
            seconds = time.perf_counter() - t0
        load = loadavg()
        wire.sample()
        sent, _ = wire.totals()
        upload = block_bytes(src, "bytes_out") - out0
        from_peers = []
        asked = missing = 0
        for r in rcv:
            peers = r.get("/status")["blocks"]["peers"]
            got = sum(p["bytes_in"] for p in peers.values())
            from_peers.append(1 - peers.get(str(src.key.peer_id), {}).get("bytes_in", 0) / max(1, got))
            asked += sum(p["blocks_in"] + p["missing"] for p in peers.values())
            missing += sum(p["missing"] for p in peers.values())
        for _, p in targets:
            same_tree(tree, p, mtimes=True)
    ratio = upload / total
    return [
        Row(f"c  source upload / data, 1 -> {receivers} receivers, {mib(total)}", f"{ratio:.2f}", f"{receivers:.2f} (star)",
            f"{ratio / receivers:.2f}x", "<= 2.0", verdict(ratio <= 2.0),
            f"blocks out {mib(upload)}; TCP sent by the source {mib(sent)} = {sent / total:.2f}x data"),
        Row(f"c  ... time until all {receivers} in sync", f"{seconds:.1f} s",
            notes=f"{receivers * total / MiB / seconds:.0f} MiB/s delivered; receivers got {100 * statistics.mean(from_peers):.0f} % "
                  f"of their bytes from each other; {missing:,} of {asked:,} block requests answered 'missing'; load {load}"),
    ]


# -- part d -----------------------------------------------------------------------------------------------


async def part_d(base: Path, big_mib: int, small_files: int, many: int) -> list[Row]:
    rows: list[Row] = []
    tree = base / "mixed"
    total = make_mixed_tree(tree, big_mib, small_files)
    os.sync()
    await trio.sleep(1.0)  # past the scanner's racy window: every file is hashed once
    runs: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
    files = 0
    for i, workers in enumerate((1, 2, 3, 4, 4, 3, 2, 1)):  # both directions: the host's cache warms as we go
        drop_cache(tree)
        seconds, hashed, files = await scan_once(tree, base / f"mixed-{i}.db", workers)
        assert hashed == total, (hashed, total)
        runs[workers].append(seconds)
    for workers, times in runs.items():
        rates = [total / MiB / t for t in times]
        rows.append(Row(f"d  cold scan, {workers} hash worker{'s' if workers > 1 else ''}", f"{statistics.mean(rates):.0f} MiB/s",
                        notes=f"{total / MiB:.0f} MiB, {files} files; runs {', '.join(f'{r:.0f}' for r in rates)} MiB/s"))
    for workers in (1, 2, 4):
        read_all(tree)
        seconds, hashed, _ = await scan_once(tree, base / f"mixed-warm-{workers}.db", workers)
        rows.append(Row(f"d  warm scan (page cache), {workers} hash worker{'s' if workers > 1 else ''}", f"{hashed / MiB / seconds:.0f} MiB/s",
                        notes="hashlib alone: ~1100 MiB/s per core" if workers == 1 else ""))

    many_root = base / "many"
    t0 = time.perf_counter()
    make_many_files(many_root, many)
    made = time.perf_counter() - t0
    await trio.sleep(1.0)
    db = await Database.open(base / "many.db", MIGRATIONS)
    try:
        scanner = Scanner(db, IndexRepo(), folder_config(many_root))
        t0 = time.perf_counter()
        first = await scanner.full_scan()
        initial = time.perf_counter() - t0
        rows.append(Row(f"d  initial scan of {many:,} small files", f"{initial:.2f} s",
                        notes=f"{first.files_hashed / initial:,.0f} files/s (created in {made:.1f} s)"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = await scanner.full_scan()
            times.append(time.perf_counter() - t0)
            assert again.changed == 0 and again.files_hashed == 0
        rows.append(Row(f"d  rescan of {many:,} unchanged files", f"{statistics.median(times):.2f} s", target="< 3 s",
                        verdict=verdict(max(times) < 3.0), notes=f"median of 3 ({', '.join(f'{t:.2f}' for t in times)}), the slowest counts"))
    finally:
        await db.close()
    return rows


# -- part e (children) -------------------------------------------------------------------------------------


async def child_source(db_path: str, root: str) -> None:
    """Hold the index: rescan it, then page through all of it as chunks."""
    out = {"baseline": rss_kib()}
    db = await Database.open(db_path, MIGRATIONS)
    repo = IndexRepo()
    scanner = Scanner(db, repo, folder_config(Path(root)))
    await scanner.full_scan()
    out["after_rescan"] = rss_kib()
    after, chunks, entries = 0, [], 0
    while True:
        page = await db.read(functools.partial(repo.unsigned_chunks, folder="bench", after_seq=after, max_entries=10_000))
        if not page:
            break
        for ch in page:
            chunks.append(ch.to_bytes())
            entries += len(ch.entries)
        after = page[-1].seq
    out["after_chunks"] = rss_kib()
    out["peak"] = hwm_kib()
    out["entries"] = entries
    out["chunks"] = len(chunks)
    out["chunk_bytes"] = sum(map(len, chunks))
    Path(db_path + ".chunks").write_bytes(b"".join(len(c).to_bytes(4, "big") + c for c in chunks))
    await db.close()
    print(json.dumps(out))


async def child_receiver(db_path: str, chunks_path: str, target: str) -> None:
    """Take the whole index as chunks, then plan a full sync of it into an empty directory."""
    from p2pnode.sync.model import IndexChunk
    from p2pnode.sync.planner import plan

    out = {"baseline": rss_kib()}
    db = await Database.open(db_path, MIGRATIONS)
    repo = IndexRepo()
    data = Path(chunks_path).read_bytes()
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        chunk = IndexChunk.from_bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        await db.write(functools.partial(repo.accept_chunk, chunk=chunk))
    del data
    out["after_accept"] = rss_kib()
    p = await db.read(lambda c: plan(repo.iter_desired(c, "bench"), {}, {}, locate=lambda h: repo.locate(c, h)))
    out["plan_files"] = len(p.files)
    out["after_plan"] = rss_kib()
    out["peak"] = hwm_kib()
    await db.close()
    print(json.dumps(out))


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_e(base: Path, many: int) -> list[Row]:
    root = base / "many"
    if not root.exists():
        make_many_files(root, many)
        time.sleep(1.0)
    db_path = base / "e-source.db"
    if (base / "many.db").exists():
        shutil.copy(base / "many.db", db_path)
    src = run_child("--child-source", str(db_path), str(root))
    rows = [
        Row(f"e  source holding {many:,} files: after a rescan", f"{src['after_rescan'] / 1024:.0f} MiB RSS",
            notes=f"interpreter and imports {src['baseline'] / 1024:.0f} MiB"),
        Row("e  ... after serving the whole index as chunks", f"{src['after_chunks'] / 1024:.0f} MiB RSS", target="< 150 MiB peak",
            verdict=verdict(src["peak"] < 150 * 1024),
            notes=f"peak {src['peak'] / 1024:.0f} MiB; {src['chunks']} chunks, {src['chunk_bytes'] / MiB:.1f} MiB (kept in memory here)"),
    ]
    rcv = run_child("--child-receiver", str(base / "e-receiver.db"), str(db_path) + ".chunks", str(base / "target"))
    rows += [
        Row(f"e  receiver holding {many:,} desired entries", f"{rcv['after_accept'] / 1024:.0f} MiB RSS"),
        Row(f"e  ... planning a full sync ({rcv['plan_files']:,} files)", f"{rcv['after_plan'] / 1024:.0f} MiB RSS", target="< 150 MiB peak",
            verdict=verdict(rcv["peak"] < 150 * 1024), notes=f"peak {rcv['peak'] / 1024:.0f} MiB"),
    ]
    return rows


def print_table(rows: list[Row]) -> None:
    header = Row("measure", "p2pnode", "baseline", "ratio", "target", "", "notes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    for r in [header, *rows]:
        print("  ".join(f"{r[i]:<{widths[i]}}" if i == 0 else f"{r[i]:>{widths[i]}}" for i in range(6)) + "  " + r.notes)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-source":
        trio.run(child_source, sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-receiver":
        trio.run(child_receiver, sys.argv[2], sys.argv[3], sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c,d,e", help="which parts to run, e.g. a,b (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a quick check that every part works")
    ap.add_argument("--dir", default="/var/tmp", help="where the fresh work directory is made")
    ap.add_argument("--a-big-mib", type=int, help="(a, b) size of the large file (default 512; quick 64)")
    ap.add_argument("--a-small-files", type=int, help="(a, b) 1-64 KiB files (default 10,000; quick 1,000)")
    ap.add_argument("--c-mib", type=int, help="(c) data size (default 256; quick 32)")
    ap.add_argument("--c-receivers", type=int, default=8, help="(c) receivers (default 8)")
    ap.add_argument("--big-mib", type=int, help="(d) size of the large file in the cold-scan tree (default 256; quick 64)")
    ap.add_argument("--small-files", type=int, help="(d) 1-64 KiB files in the cold-scan tree (default 4,000; quick 1,000)")
    ap.add_argument("--files", type=int, help="(d, e) files in the rescan / memory tree (default 100,000; quick 20,000)")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="(a, c) py-spy the source and one receiver into DIR; summary on stderr")
    ap.add_argument("--node-config", type=json.loads, default={}, metavar="JSON",
                    help='(a-c) more config.json for every node, e.g. \'{"limits": {"connection_memory": 67108864}}\'')
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    NODE_CONFIG.update(args.node_config)
    q = args.quick

    def size(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else quick if q else full

    parts = args.parts.replace(",", "")
    base = Path(tempfile.mkdtemp(prefix="p2pnode-sync-bench-", dir=args.dir))
    rows: list[Row] = []
    loads = [f"start {loadavg()}"]
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM ends the run like Ctrl-C does, through the finally blocks that stop every process
    # started; SIGINT too when it was ignored at start (a run put in the background by a script).
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        if "a" in parts or "b" in parts:
            rows += part_ab(base, size(args.a_big_mib, 512, 64), size(args.a_small_files, 10_000, 1_000), parts, args.profile)
            loads.append(f"after a/b {loadavg()}")
        if "c" in parts:
            rows += part_c(base, size(args.c_mib, 256, 32), args.c_receivers, args.profile)
            loads.append(f"after c {loadavg()}")
        files = size(args.files, 100_000, 20_000)
        if "d" in parts:
            rows += trio.run(part_d, base, size(args.big_mib, 256, 64), size(args.small_files, 4000, 1000), files)
            loads.append(f"after d {loadavg()}")
        if "e" in parts:
            rows += part_e(base, files)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print_table(rows)
    print(f"load average (1, 5, 15 min): {'; '.join(loads)}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
