"""Process figures the benchmarks read from /proc."""

from pathlib import Path


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")
