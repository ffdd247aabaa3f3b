"""Local multi-process launch without torchrun: `launch_local` spawns `world_size` processes on
this machine (gloo on CPU, or one GPU each), runs stages one after another in every process and
returns rank 0's metrics. It plays torchrun's role (sets the rendezvous address) for tests and
single-node debugging; clusters use torchrun + `fashionchameleon train`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from .config import Recipe
from .metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, recipe_json: str, stages: list[str], run_root: str, threads: int
) -> None:
    from .parallel import init_distributed, shutdown
    from .trainer import make_run

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    recipe = Recipe.model_validate_json(recipe_json)
    device = recipe.stage(stages[0]).run.device
    info = init_distributed(device, rank, world_size, local_rank=rank)
    try:
        for stage in stages:
            make_run(recipe, stage, Path(run_root) / stage, info).run()
    finally:
        shutdown()


def launch_local(
    recipe: Recipe, stages: list[str], run_root: str | Path, world_size: int, threads: int = 1
) -> dict[str, list[dict]]:
    """Run `stages` in `world_size` local processes; returns {stage: rank-0 metrics rows}."""
    mp.spawn(
        _worker,
        args=(world_size, _free_port(), recipe.model_dump_json(), list(stages), str(run_root), threads),
        nprocs=world_size,
        join=True,
    )
    return {stage: read_metrics(Path(run_root) / stage) for stage in stages}
