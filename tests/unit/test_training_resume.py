"""Exact resume: a run stopped at a checkpoint and restarted (new objects, same run folder)
reproduces the uninterrupted run's losses and weights, for the teacher (with gradient
accumulation) and for GR-DMD (two models, two optimizers, the 1:5 schedule)."""

from __future__ import annotations

import pytest
import torch

from training.config import load_recipe
from training.metrics import read_metrics
from training.parallel import DistInfo
from training.trainer import make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(synthetic_data):
    return synthetic_data(count=3, pixel_frames=21)


def _losses(history, key):
    return [h[key] for h in history if key in h]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_resume_is_exact(data, tmp_path):
    recipe = load_recipe(
        "tiny",
        {
            "teacher.data.root": str(data),
            "teacher.run.max_steps": 6,
            "teacher.run.checkpoint_every": 3,
            "teacher.run.grad_accum": 2,
        },
    )
    full = make_run(recipe, "teacher", tmp_path / "full", DistInfo())
    expected = full.run()

    first = make_run(recipe, "teacher", tmp_path / "split", DistInfo())
    head = first.run(max_steps=4)  # checkpoints at 3 and at the stop (4)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint restores it
    resumed = make_run(recipe, "teacher", tmp_path / "split", DistInfo())
    assert resumed.step == 4 and resumed.stream.position == 4 * 2
    tail = resumed.run()
    assert _losses(head + tail, "loss") == _losses(expected, "loss")
    _assert_same_weights(full.model, resumed.model)
    assert [row["step"] for row in read_metrics(tmp_path / "split")] == list(range(6))


def test_dmd_resume_is_exact(data, tmp_path):
    recipe = load_recipe("tiny", {"dmd.data.root": str(data), "dmd.run.max_steps": 7, "dmd.run.checkpoint_every": 100})
    full = make_run(recipe, "dmd", tmp_path / "full", DistInfo())
    expected = full.run()
    head = make_run(recipe, "dmd", tmp_path / "split", DistInfo()).run(max_steps=3)
    resumed = make_run(recipe, "dmd", tmp_path / "split", DistInfo())
    assert (resumed.step, resumed.generator_steps, resumed.fake_steps) == (3, 1, 3)
    tail = resumed.run()
    for key in ("fake_loss", "generator_loss", "generator_steps"):
        assert _losses(head + tail, key) == _losses(expected, key), key
    assert len(_losses(expected, "generator_loss")) == 2  # generator steps at 0 and 5
    _assert_same_weights(full.generator, resumed.generator)
    _assert_same_weights(full.fake, resumed.fake)
