"""Shared helpers for the scripts under ``benchmarks/`` (see ../shared/BENCHMARKS.md).

Benchmarks are run as scripts (``python benchmarks/<name>.py [--quick]``); each
script imports ``_common`` from its own folder, which Python puts first on ``sys.path`` when it runs a
script; ``prunekit`` is the installed package.

- :func:`emit` prints one result as a JSON line on stdout (the only thing a
  benchmark may print there); :func:`log` writes progress to stderr.
- :func:`ratio` is "how many times better prunekit is" (``peer/value`` when lower
  is better, ``value/peer`` when higher is better).
- :func:`time_once`, :func:`median`, :func:`alternating_medians`: timings with a
  warm-up, the setup (e.g. building a fresh model) kept outside the timed region,
  and several methods interleaved run by run so that machine noise cancels in
  their ratio.
- :func:`rss_now_kb`, :func:`peak_rss_kb`, :func:`ru_maxrss_kb`,
  :func:`reset_peak_rss`: resident memory of the current process (KiB, Linux); :func:`run_child` runs a script in
  a fresh Python process and returns the JSON object it printed last on stdout,
  which is how a benchmark measures the peak RSS of one method on its own.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

MB = 1_000_000  # unit "MB" in the JSON lines is 10^6 bytes


# ----------------------------------------------------------------------------- output

def log(*args: Any) -> None:
    """Progress and diagnostics: stderr only (stdout is reserved for JSON lines)."""
    print(*args, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    log(f"WARNING: {msg}")


def ratio(value: float, peer_value: float, lower_is_better: bool = True) -> Optional[float]:
    """How many times better prunekit is than the peer; None when undefined (division by <= 0)."""
    num, den = (peer_value, value) if lower_is_better else (value, peer_value)
    if den is None or num is None or den <= 0 or not math.isfinite(den) or not math.isfinite(num):
        return None
    return num / den


def emit(bench: str, case: str, metric: str, value: float, unit: str, *, peer: Optional[str] = None,
         peer_value: Optional[float] = None, lower_is_better: bool = True, stream=None,
         **extra: Any) -> Dict[str, Any]:
    """Print one measurement as a JSON line on stdout and return it.

    With ``peer``, ``peer_value`` is required and ``ratio`` is computed from it
    (``lower_is_better`` picks the direction). ``extra`` holds the optional keys
    of the convention (``n``, ``threads``, ``batch``, ``seed``) or others; keys
    whose value is None are left out.
    """
    rec: Dict[str, Any] = {"bench": bench, "case": case, "metric": metric, "value": value, "unit": unit}
    if peer is not None:
        if peer_value is None:
            raise ValueError("peer_value is required with peer")
        rec.update(peer=peer, peer_value=peer_value, ratio=ratio(value, peer_value, lower_is_better))
    rec.update({k: v for k, v in extra.items() if v is not None})
    print(json.dumps(rec), file=stream or sys.stdout, flush=True)
    return rec


# ----------------------------------------------------------------------------- timing

def time_once(fn: Callable[[Any], Any], setup: Optional[Callable[[], Any]] = None) -> Tuple[float, Any]:
    """Seconds taken by ``fn(setup())`` (or ``fn(None)``); setup is not timed.

    Garbage is collected before the clock starts. Returns (seconds, fn's result).
    """
    arg = setup() if setup is not None else None
    gc.collect()
    t0 = time.perf_counter()
    out = fn(arg)
    return time.perf_counter() - t0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def alternating_medians(methods: Mapping[str, Tuple[Optional[Callable[[], Any]], Callable[[Any], Any]]],
                        n: int, warmup: int = 1,
                        check: Optional[Callable[[str, int, Any, Any], None]] = None,
                        progress: bool = True) -> Dict[str, List[float]]:
    """Time several methods run by run, interleaved (A B C A B C ...).

    ``methods`` maps a name to ``(setup, fn)``: ``setup()`` builds the input
    (untimed) and ``fn(input)`` is timed. ``warmup`` rounds are run first and not
    recorded. ``check(name, round, input, result)``, if given, is called after
    each run, outside the timed region (round < 0 for warm-up rounds); drop any
    reference to the input there, the helper does not keep it. Returns the list
    of ``n`` timings per method; take :func:`median` of each.
    """
    times: Dict[str, List[float]] = {name: [] for name in methods}
    for r in range(-warmup, n):
        for name, (setup, fn) in methods.items():
            arg = setup() if setup is not None else None
            gc.collect()
            t0 = time.perf_counter()
            out = fn(arg)
            dt = time.perf_counter() - t0
            if check is not None:
                check(name, r, arg, out)
            del arg, out
            gc.collect()
            if r >= 0:
                times[name].append(dt)
            if progress:
                log(f"  {'warm-up' if r < 0 else f'run {r + 1}/{n}'} {name}: {dt:.3f} s")
    return times


# ----------------------------------------------------------------------------- memory

def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_now_kb() -> int:
    """Current resident set size in KiB (``VmRSS``; falls back to the peak where /proc is missing)."""
    now = _status_kb("VmRSS")
    return now if now is not None else peak_rss_kb()


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB.

    ``VmHWM`` of /proc/self/status where it exists (the address space's high-water
    mark, which :func:`reset_peak_rss` can reset), else ``ru_maxrss`` (KiB on
    Linux). On Linux the two agree until a reset; ``ru_maxrss`` also keeps the
    peak seen when any thread of the process exited, so it cannot be reset.
    """
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else ru_maxrss_kb()


def ru_maxrss_kb() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in KiB (since the process started; never reset)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def reset_peak_rss() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``).

    Lets a child process measure the peak of one step only, not of its set-up
    (importing torch or building a model can briefly need more than what stays).
    Returns whether the reset worked; if not, the peak includes everything since
    the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, now = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and now is not None and hwm <= now + 1024


def run_child(script: str, args: Sequence[str] = (), timeout: Optional[float] = None,
              env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Run ``python script *args`` in a fresh process; return the last JSON object it printed.

    The child's stderr is passed through to ours; a non-zero exit or no JSON on
    its stdout raises RuntimeError. Note for memory: a child's ``ru_maxrss``
    starts at its parent's peak (Linux carries the high-water mark over
    fork/exec), so children should report :func:`peak_rss_kb` after
    :func:`reset_peak_rss`, not the raw ``ru_maxrss``.
    """
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                          env=dict(env) if env is not None else None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    for line in reversed(proc.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd)} printed no JSON on stdout: {proc.stdout[-500:]!r}")


def script_path(file: str) -> str:
    return os.path.abspath(file)
