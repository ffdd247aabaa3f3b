"""Fixtures shared by the unit tests (the training tests' setup lives here, once).

Nothing here is autouse: a module opts in, e.g.
    pytestmark = pytest.mark.usefixtures("one_torch_thread")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and the machine is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def math_attention(one_torch_thread):
    """One thread and the reference attention kernel (exact comparisons)."""
    from shared.models.attention import use_attention_backend

    with use_attention_backend("math"):
        yield


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Callable[..., Path]:
    """A factory of synthetic training datasets, made once per module and arguments:
    `synthetic_data(count=3, pixel_frames=21)` -> the dataset's root folder."""
    from training.data.synthetic import make_synthetic_dataset

    made: dict[tuple[int, int], Path] = {}

    def make(count: int, pixel_frames: int) -> Path:
        key = (count, pixel_frames)
        if key not in made:
            root = tmp_path_factory.mktemp(f"data-{count}x{pixel_frames}")
            make_synthetic_dataset(root, count=count, pixel_frames=pixel_frames)
            made[key] = root
        return made[key]

    return make
