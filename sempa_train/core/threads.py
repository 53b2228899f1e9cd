"""torch's CPU thread count fitted to the cores other processes leave free, and kept fitted while work goes on.

On a shared machine every OpenMP parallel step waits for the thread that shares its core with another process:
beside one busy process on 2 cores, two torch threads took 2.7x (Zen 4) to 10.7x (Sapphire Rapids) as long as
quiet to sample, and, with the count followed as below, PromptEOL encoding was 1.9x and DPO steps 4.8x as fast as
with torch's count held under an AVX2 cap, 3.4x and 13.3x without it (tests/benchmarks/threads_under_load.py, README
"Threads fitted to the load"). So the CPU loops (PromptEOL, perplexity and generation batches, DPO steps) call
``follow_load()`` between units of work: it re-measures what other processes used since its last look and sets
torch's count to the cores they left, growing it back to the count it started from when they stop.
``OMP_NUM_THREADS`` set by the user always wins.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def snapshot() -> tuple[float, float, float]:
    """(CPU seconds all processes have used, CPU seconds this process has used, a clock), from ``/proc/stat`` and
    ``os.times``: between two snapshots, ``others_busy`` gives the cores *other* processes kept busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return busy, own.user + own.system, time.monotonic()


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes between two snapshots: all CPU time less this process's, per second."""
    (busy0, own0, t0), (busy1, own1, t1) = before, after
    return max(0.0, (busy1 - busy0 - (own1 - own0)) / max(t1 - t0, 1e-9))


def busy_cores(interval: float = 0.5) -> float:
    """Cores kept busy by *other* processes over ``interval`` seconds (``/proc/stat`` minus this process)."""
    try:
        before = snapshot()
        time.sleep(interval)
        return others_busy(before, snapshot())
    except (OSError, ValueError):
        return 0.0


def fit_threads_to_load(busy: float | None = None, most: int | None = None) -> int:
    """Run torch on the cores other processes leave free: ``min(most, usable CPUs - busy cores)``, at least one,
    unless ``OMP_NUM_THREADS`` sets the count; ``most`` defaults to torch's count now. ``busy`` defaults to a
    half-second measurement. Returns the thread count now in use."""
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return threads
    most = threads if most is None else most
    busy = busy_cores() if busy is None else busy
    fitted = max(1, min(most, len(os.sched_getaffinity(0)) - round(busy)))
    if fitted != threads:
        torch.set_num_threads(fitted)
        log.info("torch on CPU: %d thread(s) instead of %d, other processes keep %.1f cores busy", fitted, threads,
                 busy)
    return fitted


class LoadFollower:
    """Called between units of work. Its first call measures other processes over ``first_look`` seconds and fits
    torch's threads (at most ``most``) to what they leave; later calls, once ``min_interval`` seconds have passed
    since the last look, fit them to what other processes used over the work just done (no sleeping). ``read``
    takes a ``snapshot`` and ``sleep`` waits (both replaceable for tests)."""

    def __init__(self, most: int | None = None, min_interval: float = 2.0, first_look: float = 0.25,
                 read: Callable[[], tuple[float, float, float]] = snapshot,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.most = most or torch.get_num_threads()
        self.min_interval, self.first_look = min_interval, first_look
        self.read = read
        self.sleep = sleep
        self._last: tuple[float, float, float] | None = None

    def __call__(self) -> int:
        try:
            first = self._last is None
            if first:  # a short look before any work
                self._last = self.read()
                self.sleep(self.first_look)
            now = self.read()
        except (OSError, ValueError):  # no /proc: leave the count as it is
            return torch.get_num_threads()
        if not first and now[2] - self._last[2] < self.min_interval:
            return torch.get_num_threads()
        before, self._last = self._last, now
        return fit_threads_to_load(others_busy(before, now), self.most)


_FOLLOWER: LoadFollower | None = None


def follow_load() -> int:
    """Call the process's one ``LoadFollower`` (made at the first call, with torch's count then as its ceiling):
    what CPU loops call between units of work. Returns the thread count now in use."""
    global _FOLLOWER
    if _FOLLOWER is None:
        _FOLLOWER = LoadFollower()
    return _FOLLOWER()
