"""Benchmark manifests (local and in the object store), chunk planning, the smoke bench, and
`eval compare`'s regression gates on hand-made reports."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from services.eval.bench import BenchError, ChunkPlan, check_samples, load_benchmark, parse_manifest
from services.eval.compare import compare_reports, format_table
from services.eval.config import DEFAULT_TOLERANCES, Tolerance
from services.eval.smoke import write_smoke_bench
from shared.storage import LocalObjectStore, LocalStoreConfig


def line(**kw) -> str:
    base = {"id": "s1", "reference": "r.png", "garment": "g.png", "prompt": "walks"}
    return json.dumps({**base, **kw})


def test_manifest_parses_samples_comments_and_switches():
    text = "\n".join(
        [
            "# HGC-Bench v1",
            "",
            line(),
            line(id="s2", frames=165, seed=3, tags=["long"]),
            line(id="s3", switches=[{"chunk": 2, "garment": "g2.png"}, {"chunk": 4, "garment": "g3.png"}]),
        ]
    )
    samples = parse_manifest(text)
    assert [s.id for s in samples] == ["s1", "s2", "s3"]
    assert samples[1].frames == 165 and samples[1].seed == 3 and samples[1].tags == ("long",)
    assert samples[2].interactive and [sw.chunk for sw in samples[2].switches] == [2, 4]
    assert not samples[0].interactive


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "manifest:1: not JSON"),
        (line() + "\n" + line(), "manifest:2: duplicate sample id 's1'"),
        (line(colour="red"), "manifest:1: colour"),
        (line(id="../etc"), "manifest:1: id"),
        (line(prompt="  "), "prompt is empty"),
        (line(frames=0), "manifest:1: frames"),
        (line(switches=[{"chunk": 3, "garment": "a"}, {"chunk": 2, "garment": "b"}]), "increasing"),
        (line(switches=[{"chunk": 0, "garment": "a"}]), "switches.0.chunk"),
        ("# only a comment\n", "no samples"),
    ],
)
def test_bad_manifests_name_the_line_and_field(text, message):
    with pytest.raises(BenchError, match=None) as e:
        parse_manifest(text)
    assert message in str(e.value)


def test_chunk_plan_matches_the_streaming_chunks():
    plan = ChunkPlan.from_latent(3)
    assert (plan.first, plan.later) == (9, 12)
    assert [plan.chunks_for(f) for f in (1, 9, 10, 21, 81, 165)] == [1, 1, 2, 2, 7, 14]
    assert [plan.first_frame_of(k) for k in range(4)] == [0, 9, 21, 33]


def _png(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)


def test_local_manifest_resolves_relative_paths_and_checks_images(tmp_path):
    _png(tmp_path / "img" / "r.png")
    _png(tmp_path / "img" / "g.png", "blue")
    (tmp_path / "bench.jsonl").write_text(
        line(reference="img/r.png", garment="img/g.png", frames=21, switches=[{"chunk": 1, "garment": "img/g.png"}])
    )
    bench = load_benchmark(tmp_path / "bench.jsonl")
    assert bench.name == "bench" and len(bench.sha256) == 64
    assert bench.image("img/r.png").size == (64, 64)
    check_samples(bench, ChunkPlan(), 81)
    (tmp_path / "bad.jsonl").write_text(
        line(reference="img/r.png", garment="img/g.png", frames=9, switches=[{"chunk": 1, "garment": "img/g.png"}])
    )
    with pytest.raises(BenchError, match="switch at chunk 1 but the video has 1 chunks"):
        check_samples(load_benchmark(tmp_path / "bad.jsonl"), ChunkPlan(), 81)
    (tmp_path / "missing.jsonl").write_text(line(reference="img/nope.png", garment="img/g.png"))
    with pytest.raises(BenchError, match=r"nope\.png"):
        check_samples(load_benchmark(tmp_path / "missing.jsonl"), ChunkPlan(), 81)


def test_manifest_in_the_object_store_resolves_against_its_folder(tmp_path):
    store = LocalObjectStore(LocalStoreConfig(root=tmp_path / "store", fsync=False))
    store.ensure_bucket()
    for name, color in (("r.png", "red"), ("g.png", "blue")):
        _png(tmp_path / name, color)
        store.put_bytes(f"benches/hgc/images/{name}", (tmp_path / name).read_bytes())
    store.put_bytes("shared/g2.png", (tmp_path / "g.png").read_bytes())
    store.put_bytes(
        "benches/hgc/manifest.jsonl",
        line(
            reference="images/r.png", garment="images/g.png", switches=[{"chunk": 1, "garment": "object:shared/g2.png"}]
        ).encode(),
    )
    bench = load_benchmark("object:benches/hgc/manifest.jsonl", store)
    assert bench.name == "manifest"
    assert bench.resolve("images/r.png") == "object:benches/hgc/images/r.png"
    assert bench.resolve("object:shared/g2.png") == "object:shared/g2.png"
    check_samples(bench, ChunkPlan(), 81)
    with pytest.raises(BenchError, match="no object store"):
        load_benchmark("object:benches/hgc/manifest.jsonl", None)


def test_smoke_bench_is_deterministic_and_covers_every_run_kind(tmp_path):
    a, b = write_smoke_bench(tmp_path / "a"), write_smoke_bench(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for img in (tmp_path / "a" / "images").iterdir():
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    bench = load_benchmark(a)
    assert len(bench.samples) == 4
    assert sum(s.interactive for s in bench.samples) == 1
    assert max(s.frames for s in bench.samples) > 33  # a longer sample
    check_samples(bench, ChunkPlan(), 81)


# ---- compare -----------------------------------------------------------------------------------
def report(values: dict, sha="abc", failed=0) -> dict:
    from services.eval.metrics.base import METRIC_INFO

    return {
        "run_id": "r",
        "benchmark": {"name": "b", "sha256": sha, "failed": failed},
        "metrics": {
            k: {"title": METRIC_INFO[k].title, "higher_is_better": METRIC_INFO[k].higher_is_better, "value": v}
            for k, v in values.items()
        },
    }


def test_compare_gates_regressions_by_direction_and_tolerance():
    a = report(
        {
            "judge_hgc": 4.5,
            "backbone_fps": 24.0,
            "time_to_first_chunk_seconds": 1.0,
            "motion_amplitude": 0.8,
            "face_similarity": 0.46,
            "temporal_smoothness_warp": 0.99,
        }
    )
    b = report(
        {
            "judge_hgc": 4.45,
            "backbone_fps": 20.0,
            "time_to_first_chunk_seconds": 1.5,
            "motion_amplitude": 0.2,
            "face_similarity": 0.50,
            "temporal_smoothness_warp": None,
        }
    )
    c = compare_reports(a, b, dict(DEFAULT_TOLERANCES))
    verdicts = {r.key: r.verdict for r in c.rows}
    assert verdicts == {
        "judge_hgc": "ok",  # -0.05 within 0.1
        "backbone_fps": "regression",  # -16.7 % beyond 10 %
        "time_to_first_chunk_seconds": "regression",  # lower is better: +50 % beyond 20 %
        "motion_amplitude": "n/a",  # no preferred direction, never gated
        "face_similarity": "improved",
        "temporal_smoothness_warp": "lost",  # had a value, now none
    }
    assert {r.key for r in c.regressions} == {"backbone_fps", "time_to_first_chunk_seconds", "temporal_smoothness_warp"}
    table = format_table(c)
    assert "REGRESSION" in table and "LOST" in table and "3 regressions" in table


def test_compare_tolerance_takes_the_looser_limit_and_warns_on_different_benchmarks():
    a, b = report({"judge_lgc": 4.0}), report({"judge_lgc": 3.85}, sha="other", failed=2)
    assert compare_reports(a, b, {"judge_lgc": Tolerance(abs=0.1)}).regressions
    assert not compare_reports(a, b, {"judge_lgc": Tolerance(abs=0.1, rel=0.05)}).regressions  # 5 % of 4 = 0.2
    c = compare_reports(a, b, {})
    assert not c.regressions
    assert any("different benchmarks" in w for w in c.warnings) and any("2 failed" in w for w in c.warnings)
