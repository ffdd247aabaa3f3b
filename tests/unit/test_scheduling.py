"""Step times per batch size, the batch plan and admission by compute (`shared.runtime.scheduling`),
the generator's batcher (`services.generator.batcher`) and its open router (`services.generator.routing`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from services.generator.batcher import ChunkBatcher
from services.generator.routing import rank_replicas
from shared.runtime.scheduling import Recent, StepTimes

# ---- StepTimes -------------------------------------------------------------------------------


def test_measured_interpolated_and_extrapolated_step_times():
    t = StepTimes(initial={1: 0.1, 4: 0.25})
    assert t.seconds(1) == 0.1 and t.seconds(4) == 0.25
    assert t.seconds(2) == pytest.approx(0.15)  # linear between measured sizes
    assert t.seconds(8) == pytest.approx(0.5)  # past the largest: its per-session cost, no further gain
    assert t.seconds(0) == 0.0
    with pytest.raises(ValueError, match="no step time"):
        StepTimes().seconds(1)


def test_observations_are_smoothed_and_checked():
    t = StepTimes(smoothing=0.5)
    t.observe(2, 1.0)
    t.observe(2, 2.0)
    assert t.table() == {2: 1.5}
    for bad in ((0, 1.0), (1, -1.0), (1, math.nan)):
        with pytest.raises(ValueError):
            t.observe(*bad)


def test_plan_picks_the_fastest_measured_batch_and_never_a_slower_one():
    # batching pays (a GPU at low resolution, a tiny model): 4 sessions in one step
    pays = StepTimes(initial={1: 0.1, 2: 0.12, 4: 0.16})
    assert pays.plan(4) == [4] and pays.plan(6) == [4, 2] and pays.plan(9) == [4, 4, 1]
    assert pays.plan(4, max_batch=2) == [2, 2]
    # compute-bound: a batch of 2 costs more than two singles -> one at a time
    bound = StepTimes(initial={1: 0.1, 2: 0.21, 4: 0.5})
    assert bound.plan(3) == [1, 1, 1] and bound.round_seconds(3) == pytest.approx(0.3)
    # unmeasured sizes are never chosen, even if interpolation would make them look good
    assert StepTimes(initial={1: 0.1, 8: 0.2}).plan(5) == [1] * 5
    assert StepTimes().plan(3) == [1, 1, 1]  # nothing measured: one at a time
    # a batch within noise of its members' cost is not worth it (min_gain 2% per session)
    assert StepTimes(initial={1: 0.1, 2: 0.199}).plan(2) == [1, 1]
    assert StepTimes(initial={1: 0.1, 2: 0.19}).plan(2) == [2]
    assert pays.plan(0) == []


def test_admission_holds_playback_speed_with_headroom():
    t = StepTimes(initial={1: 0.12, 2: 0.2, 4: 0.36})
    ok = t.admits(4, chunk_seconds=0.5, headroom=0.2)
    assert ok.admitted and ok.round_seconds == pytest.approx(0.36) and ok.headroom == pytest.approx(0.5 / 0.36 - 1)
    no = t.admits(5, chunk_seconds=0.5, headroom=0.2)  # [4, 1]: 0.48 s * 1.2 > 0.5 s
    assert not no.admitted and no.round_seconds == pytest.approx(0.48)
    assert t.admits(5, chunk_seconds=0.5, headroom=0.0).admitted  # without headroom 0.48 s fits
    assert t.realtime_sessions(0.5, 0.2, limit=64) == 4 and t.realtime_sessions(0.5, 0.2, limit=2) == 2
    assert t.admits(0, 0.5, 0.2).headroom == math.inf


# ---- the batcher -----------------------------------------------------------------------------


class _Session:
    """Stands in for a VideoSession at the latent level (generate / is_open / .latent)."""

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail, self.is_open, self.chunk_index = name, fail, True, 0

    def generate(self):
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        self.chunk_index += 1
        return SimpleNamespace(latents=torch.zeros(1), index=self.chunk_index - 1, generate_seconds=0.0)


@contextlib.asynccontextmanager
async def _free_lock():
    yield


def test_due_sessions_step_together_and_in_arrival_order(monkeypatch):
    batches: list[list[str]] = []

    def fake_batch(sessions):
        batches.append([s.name for s in sessions])
        return [s.generate() for s in sessions]

    monkeypatch.setattr("services.generator.batcher.generate_batch", fake_batch)
    times = StepTimes(initial={1: 0.1, 2: 0.11, 4: 0.12})
    seen: list[tuple[int, float]] = []
    batcher = ChunkBatcher(times, _free_lock, max_batch=4, wait_s=0.01, observe=lambda n, s: seen.append((n, s)))
    sessions = [_Session(f"s{i}") for i in range(6)]

    async def main():
        return await asyncio.gather(*(batcher.generate(s) for s in sessions))

    results = asyncio.run(main())
    assert batches == [["s0", "s1", "s2", "s3"], ["s4", "s5"]]  # plan(6) = [4, 2], arrival order kept
    assert [r[0].index for r in results] == [0] * 6 and [n for n, _ in seen] == [4, 2]
    assert batcher.steps == 2 and set(times.table()) == {1, 2, 4}


def test_one_failing_session_does_not_fail_its_batch_neighbours(monkeypatch):
    def fake_batch(sessions):  # like generate_batch: a failing member fails the batch, nobody advances
        if any(s.fail for s in sessions):
            raise RuntimeError("the batch failed")
        return [s.generate() for s in sessions]

    monkeypatch.setattr("services.generator.batcher.generate_batch", fake_batch)
    batcher = ChunkBatcher(StepTimes(initial={1: 0.1, 3: 0.1}), _free_lock, max_batch=4, wait_s=0.01)
    good, bad, closed = _Session("good"), _Session("bad", fail=True), _Session("closed")
    closed.is_open = False

    async def main():
        return await asyncio.gather(*(batcher.generate(s) for s in (good, bad, closed)), return_exceptions=True)

    ok, failed, gone = asyncio.run(main())
    assert ok[0].index == 0 and good.chunk_index == 1
    assert isinstance(failed, RuntimeError) and "bad failed" in str(failed)
    assert type(gone).__name__ == "SessionClosed"


def test_a_cancelled_waiter_is_skipped_and_the_others_still_step():
    batcher = ChunkBatcher(StepTimes(initial={1: 0.1, 2: 0.1}), _free_lock, max_batch=4, wait_s=0.05)
    a, b = _Session("a"), _Session("b")

    async def main():
        ta = asyncio.create_task(batcher.generate(a))
        tb = asyncio.create_task(batcher.generate(b))
        await asyncio.sleep(0.01)
        ta.cancel()  # a's loop was stopped while it waited for its batch
        return await tb

    result = asyncio.run(main())
    assert result[0].index == 0 and b.chunk_index == 1 and a.chunk_index == 0


# ---- the open router -------------------------------------------------------------------------


def test_opens_rank_replicas_by_room_then_headroom():
    stats = [
        {"replica_id": "a", "free_sessions": 1, "headroom": 0.5, "draining": False},
        {"replica_id": "b", "free_sessions": 3, "headroom": 0.3, "draining": False},
        {"replica_id": "c", "free_sessions": 0, "headroom": 2.0, "draining": False},  # full
        {"replica_id": "d", "free_sessions": 5, "headroom": 9.0, "draining": True},  # draining
        None,  # just started: no stats yet
        {"replica_id": "f", "free_sessions": 3, "headroom": 0.9, "draining": False},
    ]
    assert rank_replicas(stats, set()) == [[5], [1], [0], [4], [2], [3]]
    # a replica that refused this very open goes after the full ones, whatever it reported
    assert rank_replicas(stats, {"f"}) == [[1], [0], [4], [2], [5], [3]]


# ---- the generators' autoscaling policy --------------------------------------------------------


def test_generators_scale_on_realtime_capacity_not_requests():
    from services.generator.scaling import RealtimeCapacityPolicy, desired_generators

    assert desired_generators(0, [4.0, 4.0], 0.7) == 1
    assert desired_generators(5, [4.0, 4.0], 0.7) == 2  # 5 / (4 * 0.7) = 1.8
    assert desired_generators(6, [4.0, 4.0], 0.7) == 3  # 2.1: scale out before admission refuses
    assert desired_generators(6, [], 0.7) is None
    with pytest.raises(ValueError):
        desired_generators(1, [1.0], 0.0)
    policy = RealtimeCapacityPolicy(target_utilisation=0.5)
    ctx = SimpleNamespace(
        aggregated_metrics={"sessions": {"r1": 3.0, "r2": 4.0}, "realtime_sessions": {"r1": 4.0, "r2": 4.0}},
        target_num_replicas=2,
    )
    desired, state = policy(ctx)
    assert desired == 4 and state["sessions"] == 7.0  # 7 / (4 * 0.5) = 3.5
    starting = SimpleNamespace(aggregated_metrics={}, target_num_replicas=3)
    assert policy(starting) == (3, {})  # nothing reported yet: keep the target


def test_the_router_reads_the_replicas_that_refused_this_open_from_its_meta():
    from services.generator.routing import EXCLUDE_KEY, _excluded

    positional = SimpleNamespace(args=["state", "acme", {EXCLUDE_KEY: ["gen-a", "gen-b"]}], kwargs={})
    assert _excluded(positional) == {"gen-a", "gen-b"}
    assert _excluded(SimpleNamespace(args=[], kwargs={"meta": {EXCLUDE_KEY: ["gen-c"]}})) == {"gen-c"}
    assert _excluded(SimpleNamespace(args=["state", "acme", {}], kwargs={})) == set()
    assert _excluded(None) == set()


def test_a_step_does_not_wait_for_others_when_every_session_is_already_due():
    batcher = ChunkBatcher(StepTimes(initial={1: 0.1}), _free_lock, max_batch=4, wait_s=60.0, sessions=lambda: 1)

    async def main():  # with the 60 s join window honoured this would time out
        return await asyncio.wait_for(batcher.generate(_Session("only")), timeout=5.0)

    assert asyncio.run(main())[0].index == 0


def test_recent_keeps_the_last_n_measurements():
    r = Recent(3)
    assert r.median is None and r.max is None
    for x in (5.0, 0.1, 0.2, 0.3):  # the first (a cold path, say) has left the window
        r.observe(x)
    assert r.median == 0.2 and r.max == 0.3
