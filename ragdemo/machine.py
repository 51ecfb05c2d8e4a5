"""What machine this is and how busy it is: the stamp every results suite carries, and the check that tells a
class when other programs are using the CPU (a timing taken then says little about the method)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# the instruction-set extensions that change which kernels run, so two machines' timings compare only if these match
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The kernel-relevant CPU flags present (KERNEL_FLAGS), in that order."""
    for line in _cpuinfo():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FLAGS if f in have]
    return []


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not on Windows
        return None


def git_commit(repo: Path) -> str:
    """HEAD's short hash, with '+uncommitted' when the work tree differs from it; '' outside a git checkout."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+uncommitted" if head and dirty else "")


# ------------------------------------------------------------------ is someone else using the CPU?
BUSY_SHARE = 0.25  # other programs using more than this share of the machine's CPU make timings unreliable


def _machine_busy_s() -> float | None:
    """CPU seconds every program on the machine has spent busy since boot (/proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class CpuShare:
    """How much of the machine's CPU other programs used while this process did something."""

    seconds: float  # wall time measured
    others: float | None  # share of all cores busy with other programs (0..1), None where it cannot be told

    @property
    def unreliable(self) -> bool:
        return self.others is not None and self.others > BUSY_SHARE

    def warning(self) -> str:
        if not self.unreliable:
            return ""
        return (f"Timings are unreliable right now: other programs used {self.others:.0%} of this machine's CPU "
                "while these answers ran, so a method's time says as much about them as about the method. Repeat "
                "the Compare when the machine is quiet, or use 3 or 5 repeats and read the medians.")


class CpuMeter:
    """`with CpuMeter() as meter: ...` then `meter.share`: the machine's CPU time minus this process's own,
    over the cores available, during the block."""

    def __enter__(self) -> "CpuMeter":
        self._wall, self._machine, self._own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        self.share = CpuShare(0.0, None)
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        machine = _machine_busy_s()
        if machine is None or self._machine is None or wall <= 0:
            self.share = CpuShare(wall, None)
            return
        others = max(0.0, (machine - self._machine) - (_own_cpu_s() - self._own))
        self.share = CpuShare(wall, min(1.0, others / (wall * (os.cpu_count() or 1))))


def stamp(repo: Path, command: str, lm=None) -> dict:
    """Where and when a results suite ran: machine, CPU flags, memory, Python and torch, the model's dtype, load
    average, date, commit and the command (wall time and the final load are added when it ends)."""
    import torch

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "dtype": str(lm.dtype).replace("torch.", "") if lm is not None else "",
            "model": getattr(lm, "model_id", ""), "load_start": load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(repo),
            "command": command}
