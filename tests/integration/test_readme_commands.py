"""Every ```bash block of the READMEs runs as written, or is listed here with the reason it cannot
run on a CPU machine without a cluster.

Blocks are found by their file and first command. A runnable block runs command by command in a
scratch folder (examples/, checkpoints/ and benchmarks/ linked in), with the few substitutions
listed next to it that shrink it to seconds (fewer steps, samples or chunks, through the commands'
own flags); each substitution must still match the README, so an edited command is noticed. A
block that is neither run nor listed fails `test_every_block_is_run_or_listed`: a new README
command needs a decision here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READMES = (
    "README.md",
    "training/README.md",
    "training/curation/README.md",
    "services/jobs/README.md",
    "helm/README.md",
)
BIN = Path(sys.executable).parent  # the environment's `fashionchameleon`

GPU = "needs CUDA GPUs"
CLUSTER = "needs a Kubernetes cluster with the chart installed"
STUDIO = "needs a running Studio with batch workers (`fashionchameleon up`, minutes to start on 2 cores); " \
    "tests/integration/test_jobs_ray.py runs these CLI paths against a real suite"  # fmt: skip


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    commands: tuple[str, ...]  # continuation lines joined, comments dropped

    @property
    def key(self) -> tuple[str, str]:
        return self.file, self.commands[0]


@dataclass(frozen=True)
class Run:
    """How a block runs here: `setup` commands first, then each README command with `subs`
    (README text -> replacement) applied; commands starting with a `skip` prefix are not run."""

    subs: tuple[tuple[str, str], ...] = ()
    setup: tuple[str, ...] = ()
    skip: dict[str, str] = field(default_factory=dict)


def _commands(text: str) -> tuple[str, ...]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            out.append(shlex.join(tokens))
    return tuple(out)


def readme_blocks() -> list[Block]:
    blocks = []
    for name in READMES:
        text = (REPO / name).read_text(encoding="utf-8")
        for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
            commands = _commands(m.group(1))
            if commands:
                blocks.append(Block(name, text.count("\n", 0, m.start()) + 1, commands))
    return blocks


# ---- the decisions -----------------------------------------------------------------------------
# (file, first command) -> why the block does not run here.
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "pip install torch==2.13.0 '&&' pip install -e '.[dev]' '&&' fashionchameleon demo --out demo.mp4"):
        "install, demo and the whole test suite: CI runs exactly these",
    ("README.md", "python benchmarks/service.py --concurrency 1,2,4"):
        "starts the whole service suite (Ray, Serve) and sweeps concurrency: minutes; test_service_suite covers it",
    ("training/README.md", "torchrun --nproc-per-node 8 -m training.cli teacher --recipe wan2.2-ti2v-5b --data "
     "'s3://datasets/fc-62k?endpoint=minio:9000' --set data.cache_dir=/scratch/fc --run-dir runs/teacher"):
        f"{GPU} (8) and the 62k-clip dataset in an object store",
    ("training/README.md", "fashionchameleon train toy --out runs/toy"):
        "trains the toy model: 1.5 h (--quick: about 3 min, over this file's budget); the ablation script needs "
        "its run folder. tests/unit/test_toy_recipe.py runs the toy stages in miniature",
    ("training/curation/README.md", "fashionchameleon curate run --input /data/raw --out /data/curated --vlm-url "
     "http://vlm:8000/v1 --vlm-model qwen2.5-vl-72b --vlm-api-key-env VLM_KEY --edit-url "
     "http://qwen-image-edit:8000/v1 --catalog-folder /data/garments --person-backend ultralytics --person-weights "
     "/models/yolov8x-seg.pt --config curate.json --export /data/curated-plain"):
        "needs VLM and image-edit endpoints, YOLO weights and raw videos; tests/integration/test_curation_pipeline.py "
        "runs the pipeline against stub endpoints",
    ("README.md", "fashionchameleon train fast-decoder --checkpoint CK --steps 2000 --clips 96 --dit-sessions 0"):
        "about 50 min as written; even `--steps 2 --clips 1` takes over 2 min (its PSNR and speed evaluation); "
        "tests/unit/test_fast_decoder.py trains and checks the decoder in miniature",
    ("services/jobs/README.md", "fashionchameleon batch submit clips.jsonl --wait --out results/"): STUDIO,
    ("helm/README.md", "helm upgrade fc helm/fashionchameleon -n serving --reuse-values --set "
     "serve.deployments.generator.replicas=6 --set 'rayCluster.workerGroups[0].maxReplicas=8'"): CLUSTER,
    ("helm/README.md", "helm upgrade fc helm/fashionchameleon -n serving --reuse-values --set checkpoint.id=fc-2026-10-01"):
        CLUSTER,
    ("helm/README.md", "kubectl cordon gpu-node-7"): CLUSTER,
}  # fmt: skip

FC = "fashionchameleon"
RUN: dict[tuple[str, str], Run] = {
    ("README.md", "fashionchameleon generate --reference examples/person.png --garment examples/garment-red.png "
     "--prompt 'The person waves with the right hand steadily.' --chunks 6 --switch 3:examples/garment-green.png "
     "--out clip.mp4"): Run(subs=(("--chunks 6", "--chunks 4"),)),
    ("README.md", "fashionchameleon train toy --out runs/toy"): Run(
        subs=(
            ("--out runs/bench-toy", "--out runs/bench-toy --max-samples 1 --frames 21 --no-progress"),
            ("runs/bench-a runs/bench-b", "runs/bench-toy runs/bench-toy"),  # one run against itself: no regression
        ),
        skip={f"{FC} train toy": "1.5 h (--quick about 3 min); tests/unit/test_toy_recipe.py runs it in miniature"},
    ),
    ("README.md", "fashionchameleon checkpoint init --preset tiny --out ckpt/tiny"): Run(),
    ("README.md", "python benchmarks/stream.py --preset tiny --device cpu --chunks 8"): Run(
        subs=(("--device cpu --chunks 8", "--device cpu --chunks 2 --warmup 0 --no-hot-path"),),
        skip={"python benchmarks/stream.py --preset wan2.2-ti2v-5b": f"{GPU} (one H200)"},
    ),
    ("README.md", "fashionchameleon batch submit clips.jsonl --wait --out clips/"): Run(
        setup=(f"{FC} train preprocess --synthetic 2 --max-pixel-frames 21 --dtype float32 --out data/",),
        subs=(
            ("--run-dir runs/teacher", "--run-dir runs/teacher --max-steps 2"),
            ("--out runs/smoke-1", "--out runs/smoke-1 --max-samples 1 --no-progress"),
        ),
        skip={f"{FC} batch submit": STUDIO, "helm install": CLUSTER},
    ),
    ("training/README.md", "fashionchameleon train preprocess --synthetic 4 --max-pixel-frames 21 --dtype float32 "
     "--out /tmp/fc/data"): Run(
        subs=(
            ("/tmp/fc", "fc"),  # the scratch folder, not a shared /tmp path
            ("--run-dir fc/teacher", "--run-dir fc/teacher --max-steps 2"),
            ("--run-dir fc/tf", "--run-dir fc/tf --max-steps 2"),
            ("--run-dir fc/dmd", "--run-dir fc/dmd --max-steps 2"),
        ),
    ),
}  # fmt: skip


def test_every_block_is_run_or_listed():
    blocks = {b.key: b for b in readme_blocks()}
    unknown = [f"{b.file}:{b.line}: {b.commands[0]}" for k, b in blocks.items() if k not in RUN and k not in NOT_RUN]
    assert not unknown, "README command blocks neither run nor listed in NOT_RUN:\n" + "\n".join(unknown)
    stale = [k for k in [*RUN, *NOT_RUN] if k not in blocks]
    assert not stale, f"listed here but no longer in the READMEs: {stale}"
    assert not set(RUN) & set(NOT_RUN)
    for key, run in RUN.items():  # every substitution and skip still matches its README text
        text = "\n".join(blocks[key].commands)
        for old, new in run.subs:  # in order: a later one may refine an earlier one's result
            assert old in text, f"{key}: {old!r} is no longer in the block"
            text = text.replace(old, new)
        for prefix in run.skip:
            assert any(c.startswith(prefix) for c in blocks[key].commands), (key, prefix)


def _apply(command: str, subs: tuple[tuple[str, str], ...]) -> str:
    for old, new in subs:
        command = command.replace(old, new)
    return command


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


def _run(command: str, cwd: Path) -> None:
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == FC:
        argv[0] = str(BIN / FC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RUN), ids=lambda k: f"{k[0]}:{k[1].split(' --')[0]}")
def test_readme_block_runs(key, scratch: Path):
    block = {b.key: b for b in readme_blocks()}[key]
    run = RUN[key]
    work = scratch / re.sub(r"[^a-z0-9]+", "-", f"{key[0]}-{key[1][:40]}".lower())
    work.mkdir()
    for name in ("examples", "checkpoints", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    for command in run.setup:
        _run(command, work)
    ran = 0
    for command in block.commands:
        if any(command.startswith(prefix) for prefix in run.skip):
            continue
        command = _apply(command, run.subs)
        _run(command, work)
        ran += 1
        out = re.search(r"--out (\S+\.mp4)", command)
        if out:
            assert (work / out.group(1)).is_file(), command
    assert ran, "nothing of this block ran"
