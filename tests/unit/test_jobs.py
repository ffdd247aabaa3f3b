"""Batch jobs without servers: specs and ids, request validation, the manifest, the CLI front
end, the autoscaling rule."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from fashionchameleon.v1 import common_pb2, studio_pb2
from services.common.errors import InvalidArgument, NotFound
from services.common.validation import Limits
from services.jobs import cli as batch
from services.jobs.client import clip_spec
from services.jobs.manifest import ManifestError, build_request, parse_manifest
from services.jobs.scaling import QueueDepthPolicy, desired_workers
from services.jobs.validation import (
    parse_list_jobs,
    parse_submit_clips,
    parse_watch_jobs,
    validate_job_id,
)
from shared.cli import CliError, Parser
from shared.jobs import (
    ClipSpec,
    GarmentAt,
    JobKeys,
    JobsConfig,
    JobState,
    ResultKeys,
    decode_page_token,
    derived_seed,
    encode_page_token,
    job_id_for,
)

LIMITS = Limits()
JOBS = JobsConfig()


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---- spec, ids, keys, config ------------------------------------------------------------------
def spec(**kw) -> ClipSpec:
    base = dict(
        reference_key="uploads/acme/ref",
        garments=(GarmentAt(chunk_index=0, object_key="uploads/acme/g"),),
        prompt="walks",
        chunks=3,
        seed=1,
        idempotency_key="k1",
    )
    return ClipSpec(**{**base, **kw})


def test_job_ids_and_seeds_are_deterministic_per_tenant_and_key():
    assert job_id_for("acme", "k") == job_id_for("acme", "k")
    assert job_id_for("acme", "k") != job_id_for("acme", "k2") != job_id_for("globex", "k")
    validate_job_id(job_id_for("acme", "any key/with:chars"))
    assert derived_seed("acme", "k") == derived_seed("acme", "k") != derived_seed("acme", "k2")
    assert 0 <= derived_seed("acme", "k") < 2**63


def test_spec_hash_covers_the_video_not_the_labels():
    assert spec().spec_hash == spec(labels={"sku": "1"}).spec_hash
    for change in ({"seed": 2}, {"prompt": "runs"}, {"chunks": 4}, {"reference_key": "uploads/acme/other"}):
        assert spec(**change).spec_hash != spec().spec_hash
    keys = ResultKeys.of("jobs", "acme", "job_x", spec().spec_hash)
    assert keys.video.startswith(f"jobs/acme/job_x/{spec().spec_hash[:16]}/") and keys.video.endswith("clip.mp4")


@pytest.mark.parametrize(
    "garments, chunks",
    [
        ((GarmentAt(chunk_index=1, object_key="a"),), 3),  # does not start at 0
        ((GarmentAt(chunk_index=0, object_key="a"), GarmentAt(chunk_index=0, object_key="b")), 3),  # not increasing
        ((GarmentAt(chunk_index=0, object_key="a"), GarmentAt(chunk_index=3, object_key="b")), 3),  # past the end
    ],
)
def test_spec_refuses_bad_schedules(garments, chunks):
    with pytest.raises(ValidationError):
        spec(garments=garments, chunks=chunks)


def test_keys_share_one_hash_slot_and_config_checks():
    keys = JobKeys("fc")
    names = [keys.stream, keys.delayed, keys.dead, keys.record("job_a"), keys.tenant_index("t"), keys.events("t")]
    assert all("{jobs}" in n for n in names)
    with pytest.raises(ValueError):
        JobKeys("bad{ns}")
    with pytest.raises(ValidationError):
        JobsConfig(claim_idle_s=10, heartbeat_s=6)
    cfg = JobsConfig(backoff_base_s=2, backoff_max_s=10)
    assert [cfg.backoff_s(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_page_tokens_round_trip_and_reject_garbage():
    member = f"{1700000000000:015d}:{job_id_for('acme', 'k')}"
    assert decode_page_token(encode_page_token(member)) == member
    for bad in ("", "!!!", encode_page_token("1:job_x"), encode_page_token("x" * 40)):
        with pytest.raises(ValueError):
            decode_page_token(bad)


# ---- request validation ---------------------------------------------------------------------
def request(*clips, shared=()) -> studio_pb2.SubmitClipsRequest:
    return studio_pb2.SubmitClipsRequest(
        clips=list(clips), shared_images=[common_pb2.ImageInput(data=d) for d in shared]
    )


def good_clip(key="k", **kw) -> studio_pb2.ClipSpec:
    args = dict(
        reference=0, garments=[(0, "catalog:sku-1"), (2, "object:uploads/acme/g")], prompt="walks", chunks=3, key=key
    )
    args.update(kw)
    return clip_spec(**args)


def test_submit_validation_accepts_shared_catalog_and_object_images():
    clips = parse_submit_clips(
        request(good_clip("a"), good_clip("b", seed=5), shared=[png_bytes()]), LIMITS, JOBS, tenant="acme"
    )
    assert [c.idempotency_key for c in clips] == ["a", "b"]
    assert clips[0].reference is clips[1].reference and clips[0].reference.sha256
    assert clips[0].seed is None and clips[1].seed == 5
    assert [(k, g.source) for k, g in clips[0].garments] == [(0, "catalog_id"), (2, "object_key")]


@pytest.mark.parametrize(
    "clip, field",
    [
        (good_clip(key=""), "clips[1].idempotency_key"),
        (good_clip(key="has space"), "clips[1].idempotency_key"),
        (good_clip(chunks=0), "clips[1].chunks"),
        (good_clip(prompt="  "), "clips[1].prompt"),
        (good_clip(reference=5), "clips[1].reference.shared_index"),
        (good_clip(reference=b"not an image"), "clips[1].reference.image.data"),
        (good_clip(garments=[(1, "catalog:sku-1")]), "clips[1].garments[0].chunk_index"),
        (good_clip(garments=[(0, "catalog:a"), (0, "catalog:b")]), "clips[1].garments[1].chunk_index"),
        (good_clip(garments=[(0, "catalog:a"), (3, "catalog:b")]), "clips[1].garments[1].chunk_index"),
        (good_clip(garments=[(0, "catalog:NOT A SLUG")]), "clips[1].garments[0].garment.image.catalog_id"),
        (good_clip(garments=[]), "clips[1].garments"),
        (good_clip(labels={"bad key!": "x"}), "clips[1].labels"),
    ],
)
def test_submit_validation_names_the_clip_and_field(clip, field):
    with pytest.raises(InvalidArgument) as err:
        parse_submit_clips(request(good_clip("ok"), clip, shared=[png_bytes()]), LIMITS, JOBS, tenant="acme")
    assert err.value.metadata["field"] == field and err.value.metadata["index"] == "1"
    assert err.value.message.startswith(field)


def test_submit_validation_limits_and_foreign_object_keys():
    with pytest.raises(InvalidArgument):
        parse_submit_clips(request(), LIMITS, JOBS)
    small = JobsConfig(max_clips_per_batch=2, max_chunks_per_clip=2)
    with pytest.raises(InvalidArgument) as err:
        parse_submit_clips(request(*(good_clip(str(i)) for i in range(3)), shared=[png_bytes()]), LIMITS, small)
    assert err.value.metadata["limit"] == "2"
    with pytest.raises(NotFound):  # another tenant's upload looks missing
        parse_submit_clips(request(good_clip(reference="object:uploads/globex/x")), LIMITS, JOBS, tenant="acme")


def test_list_and_watch_validation():
    assert parse_list_jobs(studio_pb2.ListJobsRequest(), JOBS).page_size == JOBS.default_page_size
    assert parse_list_jobs(studio_pb2.ListJobsRequest(page_size=10_000), JOBS).page_size == JOBS.max_page_size
    states = parse_list_jobs(studio_pb2.ListJobsRequest(states=[studio_pb2.Job.FAILED]), JOBS).states
    assert states == {JobState.FAILED}
    for bad in (studio_pb2.ListJobsRequest(page_token="zz"), studio_pb2.ListJobsRequest(states=[0])):
        with pytest.raises(InvalidArgument):
            parse_list_jobs(bad, JOBS)
    job = job_id_for("acme", "k")
    assert parse_watch_jobs(studio_pb2.WatchJobsRequest(job_ids=[job, job]), JOBS) == [job]
    with pytest.raises(InvalidArgument):
        parse_watch_jobs(studio_pb2.WatchJobsRequest(job_ids=["ses_x"]), JOBS)


# ---- manifest -------------------------------------------------------------------------------
@pytest.fixture()
def images(tmp_path: Path) -> Path:
    (tmp_path / "anna.png").write_bytes(png_bytes(1))
    (tmp_path / "red.png").write_bytes(png_bytes(2))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


def line(**fields) -> str:
    base = {"reference": "anna.png", "garments": [[0, "red.png"], [2, "catalog:sku-9"]], "prompt": "walks", "chunks": 4}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None})


def test_manifest_parses_and_builds_one_request_with_shared_files(images):
    text = "\n".join(
        [
            "# a comment",
            line(id="anna-red", seed=3, labels={"sku": "9"}),
            "",
            line(garments=None, garment="object:uploads/acme/x"),
            line(garments=[{"chunk": 0, "image": "red.png"}]),
        ]
    )
    clips = parse_manifest(text, images)
    assert [c.line for c in clips] == [2, 4, 5]
    assert clips[0].key == "anna-red" and clips[1].key.startswith("auto-")
    assert clips[1].key == parse_manifest(line(garments=None, garment="object:uploads/acme/x"), images)[0].key
    req = build_request(clips)
    assert len(req.shared_images) == 2  # anna.png and red.png, each once
    assert req.clips[0].seed == 3 and not req.clips[1].HasField("seed")
    assert req.clips[0].garments[1].garment.image.catalog_id == "sku-9"
    assert req.clips[2].reference.shared_index == req.clips[0].reference.shared_index


def test_malformed_manifest_lines_are_reported_by_line_number(images):
    text = "\n".join(
        [
            line(id="ok"),  # 1 fine
            "{not json",  # 2
            line(chunks=0),  # 3
            line(garments=[[1, "red.png"]]),  # 4
            line(reference="missing.png"),  # 5
            line(reference="broken.png"),  # 6
            line(prompt=""),  # 7
            line(colour="red"),  # 8
            line(id="ok", prompt="another clip"),  # 9 reuses line 1's id
            "[1, 2]",  # 10
            line(garments=[[0, "red.png"], [9, "red.png"]]),  # 11
        ]
    )
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, images)
    assert [n for n, _ in err.value.problems] == list(range(2, 12))
    message = str(err.value)
    for fragment in (
        "line 2: not valid JSON",
        "line 3: 'chunks'",
        "line 4: garments[0]",
        "line 5: reference",
        "missing.png",
        "line 6: reference",
        "line 7: 'prompt'",
        "line 8: unknown field(s) colour",
        "line 9: id 'ok' is already used on line 1",
        "line 10: expected a JSON object",
        "line 11: garments[1]: chunk 9 is past the last chunk (3)",
    ):
        assert fragment in message, fragment
    with pytest.raises(ManifestError, match="no clips"):
        parse_manifest("\n# only a comment\n", images)


def cli(*argv: str):
    parser = Parser(prog="fashionchameleon")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    batch.register(sub)
    args = parser.parse_args(list(argv))
    return args.run(args)


def test_cli_rejects_a_bad_manifest_before_connecting(images, capsys):
    manifest = images / "clips.jsonl"
    manifest.write_text(line(id="a") + "\n" + line(chunks="many") + "\n")
    with pytest.raises(CliError) as err:
        cli("batch", "submit", str(manifest), "--target", "127.0.0.1:1", "--api-key", "k")
    assert "nothing submitted" in str(err.value) and "line 2: 'chunks'" in str(err.value)
    manifest.write_text(line(id="a") + "\n" + line(id="b") + "\n")
    assert cli("batch", "submit", str(manifest), "--dry-run") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clips"] == 2 and out["shared_images"] == 2 and out["submitted"] is False
    with pytest.raises(CliError, match="API key"):
        cli("batch", "status", "job_x", "--api-key", "")


def test_progress_bar_counts_states():
    stream = io.StringIO()
    bar = batch.ProgressBar(4, stream=stream, width=8)
    bar.update({"a": "SUCCEEDED", "b": "FAILED", "c": "RUNNING", "d": "QUEUED"}, 2.5)
    assert "[####=...] 62%  2/4 done (1 ok, 1 failed, 0 cancelled), 1 running, 1 waiting" in stream.getvalue()


BAR = re.compile(
    r"\[(#*)(=*)(\.*)\] (\d+)%  (\d+)/(\d+) done \((\d+) ok, (\d+) failed, (\d+) cancelled\), (\d+) running, (\d+) waiting"
)


def _check_bar_agrees(line: str, width: int, states: dict[str, str], total: int) -> tuple[int, int, int]:
    """The bar's parts against its words: `#` is exactly the done share, the filled length the
    percentage, the counts add up to the jobs. Returns (#, filled, percent)."""
    m = BAR.search(line)
    assert m, line
    full, partial, empty = (len(g) for g in m.groups()[:3])
    pct, done, shown_total, ok, failed, cancelled, running, waiting = (int(g) for g in m.groups()[3:])
    assert full + partial + empty == width
    finished = sum(s in batch.FINAL for s in states.values())
    assert (done, shown_total) == (finished, total)
    assert ok + failed + cancelled == done and done + running + waiting == total
    assert full == width * done // total  # the solid part says "done/total", nothing more
    assert abs((full + partial) / width - pct / 100) < 1 / width + 0.01  # the filled part says the percentage
    return full, full + partial, pct


@pytest.mark.parametrize(
    "states, chunks, total",
    [
        ({}, 0.0, 2),  # nothing seen yet
        ({"a": "RUNNING", "b": "RUNNING"}, 1.0, 2),  # the case: half the chunks, no job done
        ({"a": "RUNNING", "b": "RUNNING"}, 1.98, 2),
        ({"a": "SUCCEEDED", "b": "RUNNING"}, 1.0, 2),
        ({"a": "SUCCEEDED", "b": "RUNNING", "c": "QUEUED"}, 1.5, 7),  # jobs not reported yet wait
        ({"a": "FAILED", "b": "CANCELLED", "c": "SUCCEEDED"}, 3.0, 3),
        ({f"j{i}": "SUCCEEDED" for i in range(50)}, 50.0, 50),
    ],
)
def test_progress_bar_fill_agrees_with_its_count(states, chunks, total):
    """Issue 16: the bar was half full while saying "0/2 done"."""
    bar = batch.ProgressBar(total, stream=io.StringIO(), width=30)
    full, filled, pct = _check_bar_agrees(bar.render(states, chunks), 30, states, total)
    if chunks >= total:
        assert (full, filled, pct) == (30, 30, 100)
    if not any(s in batch.FINAL for s in states.values()):
        assert full == 0


def test_batch_wait_draws_the_bar_from_the_job_events(monkeypatch):
    """`_wait` turns each job event into the bar's states and chunk progress: every line drawn
    agrees with itself and the last one shows every job done."""

    def job(job_id: str, state: int, done: int) -> studio_pb2.Job:
        return studio_pb2.Job(job_id=job_id, state=state, chunks_done=done, chunks_total=4)

    events = [
        job("a", studio_pb2.Job.RUNNING, 2),
        job("b", studio_pb2.Job.RUNNING, 4),  # all chunks generated, the clip not yet saved
        job("a", studio_pb2.Job.RUNNING, 4),
        job("a", studio_pb2.Job.SUCCEEDED, 4),
        job("b", studio_pb2.Job.FAILED, 4),
    ]
    latest: dict[str, studio_pb2.Job] = {}

    class Client:
        def watch_jobs(self, job_ids, timeout_s=None):
            for e in events:
                latest[e.job_id] = e
                yield studio_pb2.JobEvent(job=e)

        def get_job(self, job_id):
            return latest[job_id]

    stream = io.StringIO()
    real = batch.ProgressBar
    monkeypatch.setattr(batch, "ProgressBar", lambda total: real(total, stream=stream, width=20))
    final = batch._wait(Client(), ["a", "b"], None)
    assert len(stream.getvalue().splitlines()) == len(events)  # one line per change (not a terminal)
    lines = stream.getvalue().splitlines()
    seen: dict[str, str] = {}
    for line, event in zip(lines, events):
        seen[event.job_id] = studio_pb2.Job.State.Name(event.state)
        _check_bar_agrees(line, 20, seen, 2)
    assert "0/2 done" in lines[1] and "[=" in lines[1]  # 6 of 8 chunks, still nothing done
    assert lines[-1].startswith("[" + "#" * 20 + "] 100%  2/2 done (1 ok, 1 failed")
    assert {j: studio_pb2.Job.State.Name(x.state) for j, x in final.items()} == {"a": "SUCCEEDED", "b": "FAILED"}


# ---- autoscaling ----------------------------------------------------------------------------
def test_desired_workers_follow_queue_depth():
    assert desired_workers(0, 2.0) == 0
    assert [desired_workers(d, 2.0) for d in (1, 2, 3, 10)] == [1, 1, 2, 5]


def test_policy_decides_on_the_last_polled_depth():
    class Ctx:
        policy_state: ClassVar[dict] = {}

    async def main():
        policy = QueueDepthPolicy(
            '{"url": "redis://127.0.0.1:1/0", "socket_connect_timeout_s": 0.2}',
            JobsConfig(target_jobs_per_worker=3, depth_poll_s=0.01).model_dump_json(),
        )
        assert policy(Ctx()) == (0, {"job_queue_depth": 0})
        await asyncio.sleep(0.5)  # the poll fails (no Redis there): the last depth is kept
        policy.depth = 7
        assert policy(Ctx())[0] == 3

    asyncio.run(main())
