"""Was the machine quiet while a row's runs ran? On a shared machine another process's work
slows whichever backend happens to be running, and a hypervisor may take CPU time away
(steal): either makes one backend look faster than it is. Around every timed run the
runner reads the kernel's CPU counters (Linux /proc/stat), the CPU time of the bench's own
processes (/proc/<pid>/stat) and the CPU clock where readable (cpufreq); a row whose runs
saw other processes busy, steal, or the clock move is marked noisy and gets no ratio."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

OTHERS_MAX = 0.25  # CPUs other processes may keep busy on average during a row's runs
STEAL_MAX = 0.05  # share of the CPU time the hypervisor may take
CLOCK_SPREAD_MAX = 1.15  # highest / lowest CPU clock seen across a row's runs
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    wall: float  # time.monotonic()
    busy: int  # every CPU's non-idle ticks (user, nice, system, irq, softirq)
    steal: int
    total: int  # every tick, steal included
    ours: int  # ticks the bench's processes used (user + system)
    mhz: float | None  # mean CPU clock, where the kernel says it


def _cpu_ticks() -> tuple[int, int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(fields[:8])


def _process_ticks(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime (all the process's threads)


def _mhz() -> float | None:
    values = []
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            values.append(int(path.read_text()) / 1000)
        except (OSError, ValueError):
            pass
    return sum(values) / len(values) if values else None


def sample(pids: list[int]) -> Sample | None:
    """Now, for the bench's processes `pids` (its runner and workers); None off Linux."""
    cpu = _cpu_ticks()
    if cpu is None:
        return None
    return Sample(time.monotonic(), *cpu, sum(_process_ticks(p) for p in pids), _mhz())


class Activity:
    """What the machine did during a row's runs, summed over the runs' intervals."""

    def __init__(self):
        self.wall = 0.0
        self.others = self.steal = self.total = 0
        self.clocks: list[float] = []

    def add(self, before: Sample | None, after: Sample | None) -> None:
        if before is None or after is None:
            return
        self.wall += after.wall - before.wall
        self.others += max(0, (after.busy - before.busy) - (after.ours - before.ours))
        self.steal += after.steal - before.steal
        self.total += after.total - before.total
        self.clocks += [m for m in (before.mhz, after.mhz) if m]

    def facts(self) -> dict | None:
        """{"others_cpus": mean CPUs other processes kept busy, "steal": share of CPU time
        stolen, "mhz": [lowest, highest] clock or None}; None where nothing was measured."""
        if self.wall <= 0 or self.total <= 0:
            return None
        return {"others_cpus": round(self.others / TICK / self.wall, 3), "steal": round(self.steal / self.total, 4),
                "mhz": [round(min(self.clocks)), round(max(self.clocks))] if self.clocks else None}


def unquiet(facts: dict | None) -> str | None:
    """Why a row's machine was not quiet enough for a ratio (None: it was, or was not measured)."""
    if not facts:
        return None
    if facts["others_cpus"] > OTHERS_MAX:
        return f"other processes kept {facts['others_cpus']:.2f} CPUs busy during its runs"
    if facts["steal"] > STEAL_MAX:
        return f"the hypervisor took {facts['steal']:.0%} of the CPU time (steal)"
    mhz = facts.get("mhz")
    if mhz and mhz[0] > 0 and mhz[1] / mhz[0] > CLOCK_SPREAD_MAX:
        return f"the CPU clock moved between {mhz[0]} and {mhz[1]} MHz"
    return None
