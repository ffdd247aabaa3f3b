"""The watchdog of `fashionchameleon up`: descendants end with their parent, even on SIGKILL,
including grandchildren that left the parent's session (as Ray's agents and redis do not stay
tied to it), and nothing outside the parent's tree is touched. Real processes, no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from services import child_reaper

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from services.child_reaper import start
    reaper = start()
    child = subprocess.Popen(["sleep", "600"])
    # a grandchild in a session of its own whose parent exits: re-parented, out of our group
    middle = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys; p = subprocess.Popen(['sleep', '600'], start_new_session=True); "
        "print(p.pid, flush=True)"], stdout=subprocess.PIPE, text=True)
    escaped = int(middle.stdout.readline())
    middle.wait()
    # a child that ignores SIGTERM: the reaper must escalate to SIGKILL
    stubborn = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    stubborn.stdout.readline()
    print(reaper.pid, child.pid, escaped, stubborn.pid, flush=True)
    time.sleep(1.5)  # the reaper has seen the whole tree
    print("ready", flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    return child_reaper._stat(pid) is not None


def _wait_gone(pids, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _readline(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError("the test's parent process did not report in time")
    return proc.stdout.readline()


@pytest.fixture()
def tree():
    bystander = subprocess.Popen(["sleep", "600"])  # ours, not below the parent: must survive
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(child_reaper.__file__)),
        start_new_session=True,
    )
    pids = [parent.pid]
    try:
        reaper, child, escaped, stubborn = (int(x) for x in _readline(parent).split())
        pids += [reaper, child, escaped, stubborn]
        assert _readline(parent).strip() == "ready"
        yield parent, reaper, [child, escaped, stubborn], bystander
    finally:
        for pid in pids:  # only what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        bystander.kill()
        bystander.wait()
        parent.wait()


def test_descendants_end_when_the_parent_is_killed(tree):
    parent, reaper, descendants, bystander = tree
    assert all(_alive(p) for p in descendants)
    os.kill(reaper, signal.SIGINT)  # a Ctrl-C reaches the whole group: the reaper stays
    # The reaper learns the tree by polling every 0.5 s: give it two scans of the finished tree.
    # (The daemonised grandchild stays in view only because `start` made the parent a child
    # subreaper; without it that grandchild went to PID 1 between scans in 4 runs of 6.)
    time.sleep(1.2)
    assert _alive(reaper)
    parent.kill()
    parent.wait()
    started = time.monotonic()
    left = _wait_gone([*descendants, reaper], timeout_s=10)
    assert not left, f"still running {time.monotonic() - started:.1f} s after the parent's SIGKILL: {left}"
    assert bystander.poll() is None, "a process outside the parent's tree was killed"


def test_table_and_tree_walk_see_this_process():
    table = child_reaper._table()
    me = os.getpid()
    assert me in table and table[me][0] == os.getppid()
    child = subprocess.Popen(["sleep", "30"])
    try:
        below = child_reaper._below({me}, child_reaper._table())
        assert child.pid in below and me not in below
    finally:
        child.kill()
        child.wait()


def test_start_makes_the_parent_a_subreaper_so_orphans_stay_below_it():
    script = textwrap.dedent("""
        import os, subprocess, sys
        from services.child_reaper import become_subreaper, _stat
        assert become_subreaper()
        middle = subprocess.Popen([sys.executable, "-c",
            "import subprocess; p = subprocess.Popen(['sleep', '30'], start_new_session=True); print(p.pid, flush=True)"],
            stdout=subprocess.PIPE, text=True)
        orphan = int(middle.stdout.readline())
        middle.wait()
        print(_stat(orphan)[0] == os.getpid(), flush=True)
        os.kill(orphan, 9)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(child_reaper.__file__)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True", "an orphan of the tree was re-parented outside it"
