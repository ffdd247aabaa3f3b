"""Attention backends: selecting one changes the kernel that runs, and the selection belongs to
an engine / session (or, without one, to the calling thread), never to the process."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.models import attention as attn
from shared.models.attention import BACKENDS, use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from shared.runtime.config import EngineConfig
from shared.runtime.pipeline import Engine

TINY = get_preset("tiny")


class KernelSpy:
    """Wraps every registered kernel and records (backend, thread) per call. With `barrier`,
    each thread waits at its first kernel call until every party has reached its own, so that
    the threads' sessions are certainly in flight at the same time."""

    def __init__(self, monkeypatch, barrier: threading.Barrier | None = None):
        self.calls: list[tuple[str, int]] = []
        self.barrier = barrier
        self._started: set[int] = set()
        self._lock = threading.Lock()
        for name, backend in list(BACKENDS.items()):
            monkeypatch.setitem(
                BACKENDS, name, attn.AttentionBackend(name, self._wrap(name, backend.fn), backend.supports)
            )

    def _wrap(self, name, fn):
        def spy(q, k, v, mask):
            tid = threading.get_ident()
            with self._lock:
                self.calls.append((name, tid))
                first = tid not in self._started
                self._started.add(tid)
            if first and self.barrier is not None:
                self.barrier.wait(timeout=60)
            return fn(q, k, v, mask)

        return spy

    def used(self, tid: int | None = None) -> set[str]:
        return {name for name, t in self.calls if tid is None or t == tid}

    def clear(self) -> None:
        self.calls.clear()
        self._started.clear()


@pytest.fixture(scope="module")
def dit():
    return InContextWanDiT.build(TINY.dit, seed=0).eval()


def _dense_forward(dit, backend: str | None) -> torch.Tensor:
    lh, lw = TINY.latent_hw()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, TINY.dit.in_channels, 3, lh, lw, generator=g)
    text = dit.embed_text(torch.randn(1, 8, TINY.dit.text_dim, generator=g))
    rope = RopeTable(TINY.dit.attention_head_dim, TINY.token_grid())
    with torch.no_grad():
        return dit(x, torch.full((1, 3), 500.0), text, DenseAttention(rope, [0, 1, 2], backend=backend))


def test_attention_backend_registry(dit, monkeypatch):
    assert {"math", "sdpa", "flash"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown attention backend"), use_attention_backend("nope"):
        pass
    spy = KernelSpy(monkeypatch)
    outs = {}
    for name in ("math", "sdpa"):
        spy.clear()
        outs[name] = _dense_forward(dit, name)
        assert spy.used() == {name}, f"selected {name}, ran {spy.used()}"
        assert len(spy.calls) == TINY.dit.num_layers  # one self-attention per layer
    assert (outs["math"] - outs["sdpa"]).abs().max().item() < 1e-5  # same math, different kernels
    spy.clear()
    _dense_forward(dit, "auto")
    assert spy.used() == {"sdpa"}  # flash needs CUDA and half precision: auto falls back on the CPU
    # The ambient default applies only where no backend is named; a named one wins.
    spy.clear()
    with use_attention_backend("math"):
        _dense_forward(dit, None)
        assert spy.used() == {"math"}
        spy.clear()
        _dense_forward(dit, "sdpa")
        assert spy.used() == {"sdpa"}
    spy.clear()
    _dense_forward(dit, None)
    assert spy.used() == {"sdpa"}  # the block restored "auto"


def test_the_ambient_default_is_per_thread(dit, monkeypatch):
    """`use_attention_backend` in one thread never leaks into another running at the same time."""
    spy = KernelSpy(monkeypatch, threading.Barrier(2))
    tids: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        tids[name] = threading.get_ident()
        try:
            with use_attention_backend(name):
                _dense_forward(dit, None)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("math", "sdpa")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert spy.used(tids["math"]) == {"math"} and spy.used(tids["sdpa"]) == {"sdpa"}


def _stream(engine: Engine, chunks: int = 2) -> torch.Tensor:
    """Open a latent-level session on fixed inputs and generate `chunks` chunks."""
    g = torch.Generator().manual_seed(3)
    lh, lw = TINY.latent_hw()
    shape = (1, TINY.dit.in_channels, 1, lh, lw)
    reference, garment = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    text = torch.randn(1, 8, TINY.dit.text_dim, generator=g)
    s = engine.session()
    s.open_latents(reference, garment, text, seed=5)
    out = torch.cat([s.generate().latents for _ in range(chunks)], dim=2)
    s.close()
    return out


@pytest.fixture(scope="module")
def engines():
    dit_only = frozenset({"dit"})
    return {
        name: Engine.from_preset("tiny", EngineConfig(attention_backend=name), parts=dit_only)
        for name in ("math", "sdpa")
    }


def test_an_engine_runs_its_own_backend_whatever_the_ambient_one(engines, monkeypatch):
    spy = KernelSpy(monkeypatch)
    alone = {}
    for name, engine in engines.items():
        spy.clear()
        other = "sdpa" if name == "math" else "math"
        with use_attention_backend(other):  # the engine's own selection wins over the thread's
            alone[name] = _stream(engine)
        assert spy.used() == {name}, f"engine on {name} ran {spy.used()}"
    assert (alone["math"] - alone["sdpa"]).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="unknown attention backend"):
        Engine.from_preset("tiny", EngineConfig(attention_backend="nope"), parts=frozenset({"dit"}))


def test_engines_with_different_backends_do_not_interfere(engines, monkeypatch):
    """Two sessions on engines with different backends, in two threads at the same time: each
    runs only its own kernel and streams exactly what it streams alone."""
    alone = {name: _stream(engine) for name, engine in engines.items()}
    spy = KernelSpy(monkeypatch, threading.Barrier(len(engines)))
    results: dict[str, torch.Tensor] = {}
    tids: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        tids[name] = threading.get_ident()
        try:
            results[name] = _stream(engines[name])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in engines:
        assert spy.used(tids[name]) == {name}, f"the {name} session ran {spy.used(tids[name])}"
        assert torch.allclose(results[name], alone[name], rtol=0, atol=1e-6), name
