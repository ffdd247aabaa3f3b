"""The shipped toy checkpoint (checkpoints/toy) really does try-on, through the normal commands.

`fashionchameleon generate` with no --checkpoint / --preset uses it. Reference: examples/person.png;
garments: examples/garment-red.png then, from chunk 3, examples/garment-green.png, both colours
held out of the training split (shared/toyworld/render.py: HOLDOUT_COLOURS). Scored from the
frames alone with the toy world's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cli.main import main
from shared.media.video import read_frames
from shared.models.checkpoint import SHIPPED_CHECKPOINT, read_preset
from shared.toyworld import metrics as tm
from shared.toyworld.render import HOLDOUT_COLOURS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROMPT = "The person waves with the right hand steadily."
SWITCH_CHUNK = 3
SWITCH_FRAME = 9 + 12 * (SWITCH_CHUNK - 1)


def _dominant(path: Path) -> tuple[int, ...]:
    a = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    cols, counts = np.unique(a[(a < 250).any(axis=1)], axis=0, return_counts=True)
    return tuple(int(c) for c in cols[counts.argmax()])


def test_example_garments_are_held_out_colours() -> None:
    assert _dominant(EXAMPLES / "garment-red.png") in HOLDOUT_COLOURS
    assert _dominant(EXAMPLES / "garment-green.png") in HOLDOUT_COLOURS


def test_shipped_checkpoint_is_small_16bit_and_records_its_training() -> None:
    preset, checkpoint_id = read_preset(SHIPPED_CHECKPOINT)
    assert preset.name == "toy" and checkpoint_id.startswith("toy-")
    size = sum(f.stat().st_size for f in SHIPPED_CHECKPOINT.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    training = json.loads((SHIPPED_CHECKPOINT / "training.json").read_text())
    assert training["stage"] == "dmd" and training["recipe"] == "toy"


@pytest.fixture(scope="module", params=["vae", "fast"])
def generated(request, tmp_path_factory) -> tuple[np.ndarray, dict]:
    """The shipped model's clip through each streaming decoder: the garment checks below hold for
    the distilled fast decoder's frames as for the VAE decoder's."""
    out = tmp_path_factory.mktemp("toy") / "clip.mp4"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "generate",
                "--reference",
                str(EXAMPLES / "person.png"),
                "--garment",
                str(EXAMPLES / "garment-red.png"),
                "--prompt",
                PROMPT,
                "--chunks",
                "6",
                "--switch",
                f"{SWITCH_CHUNK}:{EXAMPLES / 'garment-green.png'}",
                "--out",
                str(out),
                "--decoder",
                request.param,
            ]
        )
    assert rc == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    return read_frames(out), summary


def test_generate_defaults_to_the_shipped_checkpoint(generated) -> None:
    frames, summary = generated
    assert summary["checkpoint_id"].startswith("toy-") and summary["preset"] == "toy"
    assert frames.shape == (9 + 12 * 5, 160, 96, 3)


def _distances(frames: np.ndarray, garment: np.ndarray) -> np.ndarray:
    return np.array([tm.garment_fidelity(f, garment)["pattern_delta_e"] for f in frames])


def test_garment_before_and_after_the_switch_identity_and_bottoms_kept(generated) -> None:
    frames, _ = generated
    ref = np.asarray(Image.open(EXAMPLES / "person.png").convert("RGB"))
    red = np.asarray(Image.open(EXAMPLES / "garment-red.png").convert("RGB"))
    green = np.asarray(Image.open(EXAMPLES / "garment-green.png").convert("RGB"))
    assert all(tm.locate_person(f) is not None for f in frames)
    d_red, d_green = _distances(frames, red), _distances(frames, green)
    sw, after = SWITCH_FRAME, SWITCH_FRAME + 12  # one chunk after the switch
    # Before: the top is the red garment's (far closer to it than to the green one) ...
    assert (d_red[:sw] < d_green[:sw]).mean() >= 0.95 and np.median(d_red[:sw]) < 30, d_red[:sw]
    # ... after: the green garment's, within the first chunk after the switch, and it stays.
    latency = next(t - sw for t in range(sw, len(frames) - 2) if (d_green[t : t + 3] < d_red[t : t + 3]).all())
    assert latency < 12, latency
    assert (d_green[after:] < d_red[after:]).mean() >= 0.95
    assert (d_green[after:] <= tm.GARMENT_MATCH_DE).mean() >= 0.8, d_green[after:]  # a strict match too
    # Identity before the switch and the bottoms throughout (Delta-E against the reference photo).
    skin = np.array([tm.identity_score(f, ref)["skin_delta_e"] for f in frames[:sw]])
    assert skin.mean() <= 14, skin
    bottoms = np.array([tm.bottoms_score(f, ref)["delta_e"] for f in frames])
    assert bottoms.mean() <= 18, bottoms


def test_motion_is_continuous_across_the_switch(generated) -> None:
    frames, _ = generated
    jump = tm.jump_at(frames, SWITCH_FRAME)
    assert not jump["is_jump"], jump


def test_eval_run_bench_toy_and_compare_gate(tmp_path) -> None:
    """`eval run --bench toy` (shipped checkpoint by default) writes the reports; `eval compare` gates."""
    import contextlib
    import io

    run = tmp_path / "bench-a"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "eval",
                "run",
                "--bench",
                "toy",
                "--max-samples",
                "1",
                "--frames",
                "45",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
    assert rc == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert summary["benchmark"] == "toy" and summary["checkpoint_id"].startswith("toy-")
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"]["garment_accuracy_after"]["value"] is not None
    html = (run / "report.html").read_text()
    assert "data:video/mp4;base64," in html and "data:image/png;base64," in html
    planted = dict(report, run_id="candidate")
    planted["metrics"] = {
        **report["metrics"],
        "garment_match_before": {**report["metrics"]["garment_match_before"], "value": -1.0},
    }
    (tmp_path / "b.json").write_text(json.dumps(planted))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", "compare", str(run), str(run)]) == 0
        assert main(["eval", "compare", str(run), str(tmp_path / "b.json")]) == 1
