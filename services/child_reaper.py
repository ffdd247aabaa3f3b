"""Children die with their parent: the watchdog of `fashionchameleon up` (and `demo`).

`up` starts a redis-server and a local Ray (gcs_server, raylet, dashboard, log monitor, and the
raylet's own agents and workers). Ray ties the processes the driver starts directly to it
(PR_SET_PDEATHSIG), but not the raylet's agents, and nothing ties the redis-server. When `up` is
killed (SIGKILL, OOM killer, a crashed interpreter), they would be left running.

This watchdog is a small process `up` starts first. It keeps a list of every process below its
parent (pid and start time, from /proc, so a reused pid is never mistaken for one of ours), and
when the parent is gone, however it went, it ends them: SIGTERM, then SIGKILL after a grace
period. It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C reaches the whole process group; the
parent stops itself, then the watchdog clears what is left) and exits once everything is gone.
Linux only (/proc); elsewhere `start` starts nothing.

A process whose own parent exits is re-parented to the nearest "child subreaper" ancestor, else to
PID 1, and so leaves the tree below `up` (a daemonising grandchild does this within milliseconds,
usually between two scans). `start` therefore makes the calling process a child subreaper
(prctl PR_SET_CHILD_SUBREAPER): orphans of its tree are re-parented to it and stay in view. The
cost: such orphans become zombies of `up` when they exit, until `up` exits.

    python -m services.child_reaper --parent PID [--interval-s 0.5] [--grace-s 3]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = "/proc"


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, start time in clock ticks since boot) of `pid`, None if it is gone (or a zombie)."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
    if fields[0] == b"Z":
        return None  # a zombie: already dead, only waiting to be reaped
    return int(fields[1]), int(fields[2]), int(fields[19])


def _table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start time) of every live process."""
    out = {}
    for name in os.listdir(PROC):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _below(roots: set[int], table: dict[int, tuple[int, int, int]]) -> dict[int, int]:
    """pid -> start time of every process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child][2]
                todo.append(child)
    return found


def _alive(known: dict[int, int], table: dict[int, tuple[int, int, int]]) -> dict[int, int]:
    return {pid: start for pid, start in known.items() if pid in table and table[pid][2] == start}


def _signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def reap(known: dict[int, int], *, me: int, grace_s: float) -> None:
    """End every process in `known` still alive (same start time) and whatever they started
    since: SIGTERM, then SIGKILL after `grace_s`."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        table = _table()
        targets = _alive(known, table)
        targets.update(_below(set(targets), table))
        targets.pop(me, None)
        known.update(targets)
        if not targets:
            return
        if time.monotonic() >= deadline:
            sig = signal.SIGKILL
        _signal_all(targets, sig)
        if sig == signal.SIGKILL:
            time.sleep(0.1)
            if not _alive(targets, _table()):
                return
        else:
            time.sleep(0.1)


def watch(parent: int, *, interval_s: float = 0.5, grace_s: float = 3.0) -> None:
    """Record `parent`'s descendants until it is gone, then end them (see module docstring)."""
    me = os.getpid()
    st = _stat(parent)
    if st is None:
        return
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None
    known: dict[int, int] = {}
    while os.getppid() == parent and _stat(parent) is not None:
        table = _table()
        known = _alive(known, table)
        known.update(_below({parent}, table))
        known.pop(me, None)
        if pidfd is not None:
            select.select([pidfd], [], [], interval_s)  # readable when the parent has exited
        else:
            time.sleep(interval_s)
    reap(known, me=me, grace_s=grace_s)


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Make this process the child subreaper of its tree (see the module docstring). False where
    the kernel or libc refuses."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def start(parent: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog of `parent` (default: this process, which also becomes its tree's child
    subreaper). None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    if parent is None or parent == os.getpid():
        become_subreaper()
    return subprocess.Popen(
        [sys.executable, "-m", "services.child_reaper", "--parent", str(parent or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(Path(__file__).resolve().parents[1]),  # `services` importable however it was installed
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.child_reaper", description=__doc__.split("\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="pid whose descendants die with it")
    parser.add_argument("--interval-s", type=float, default=0.5, help="how often the process tree is read")
    parser.add_argument("--grace-s", type=float, default=3.0, help="SIGTERM to SIGKILL delay")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch(args.parent, interval_s=args.interval_s, grace_s=args.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
