"""Playback pacing and switch-option defaults of the generator's session loop (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fashionchameleon.v1 import common_pb2
from services.generator.service import SessionRunner, switch_options_from_proto
from shared.config import GeneratorConfig
from shared.models.presets import get_preset
from shared.runtime.session import SwitchOptions


def runner(realtime: bool, lead: float = 1.0) -> SessionRunner:
    service = SimpleNamespace(config=SimpleNamespace(generator=GeneratorConfig(realtime=realtime, lead_chunks=lead)))
    session = SimpleNamespace(preset=get_preset("tiny"))
    return SessionRunner(service, "ses_x", "t", session, "g", SwitchOptions(), max_chunks=10)


def test_chunks_are_ready_lead_chunks_before_their_playback_time():
    r = runner(realtime=True, lead=1.0)
    assert r._ready_time(0) is None  # the first chunk goes out at once
    assert r._ready_time(1) is None  # no playback clock before chunk 0 is out
    r.playback_start = 100.0
    # chunk k starts at pixel frame 9 + 12 (k - 1); a chunk is 12 frames = 0.5 s at 24 fps
    assert r._ready_time(1) == pytest.approx(100.0 + 9 / 24 - 0.5)
    assert r._ready_time(5) == pytest.approx(100.0 + 57 / 24 - 0.5)
    assert runner(realtime=True, lead=0.0)._ready_time(1) is None  # clock not started
    r0 = runner(realtime=True, lead=0.0)
    r0.playback_start = 0.0
    assert r0._ready_time(2) == pytest.approx(21 / 24)


def test_no_pacing_when_not_realtime():
    r = runner(realtime=False)
    r.playback_start = 100.0
    assert r._ready_time(3) is None


def test_unset_switch_options_mean_on_and_explicit_ones_win():
    assert switch_options_from_proto(common_pb2.SwitchOptions()) == SwitchOptions()
    opts = common_pb2.SwitchOptions(withdraw_history_kv=False)
    assert switch_options_from_proto(opts) == SwitchOptions(refresh=True, withdraw=False, disentangle=True)
    base = SwitchOptions(disentangle=False)
    assert switch_options_from_proto(common_pb2.SwitchOptions(), base) == base
