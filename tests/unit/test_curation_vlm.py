"""Curation stages 2-4 against a local OpenAI-compatible server (http.server on 127.0.0.1)
with canned answers: malformed JSON, timeouts, HTTP errors and refusals are retried or dropped
with their reason; nothing raises."""

from __future__ import annotations

import pytest

from shared.storage.config import StorageConfig
from training.curation import fakes, vlm
from training.curation.config import (
    CurationConfig,
    EditConfig,
    GarmentStageConfig,
    VLMConfig,
)
from training.curation.fakes import Reply
from training.curation.records import ClipRecord
from training.curation.stages import (
    Context,
    caption_clip,
    garment_clip,
    reference_clip,
    segment_video,
)


@pytest.fixture
def server():
    with fakes.FakeEndpoints() as srv:
        yield srv


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    fakes.write_raw_video(folder / "one.mp4", [fakes.ShotSpec(4.0, background=(120, 200, 120))], fps=8)
    return folder


@pytest.fixture
def ctx(server, raw_folder, tmp_path):
    out = StorageConfig.from_url(str(tmp_path / "out"))
    cfg = CurationConfig(
        input_folder=raw_folder,
        output=out,
        vlm=VLMConfig(base_url=server.base_url, model="fake", timeout_s=2.0, backoff_s=0, requests_per_s=0, frames=2),
        try_off=EditConfig(base_url=server.base_url, backoff_s=0, timeout_s=5),
        try_on=EditConfig(base_url=server.base_url, backoff_s=0, timeout_s=5),
        garment=GarmentStageConfig(max_tries=2),
    )
    c = Context(cfg)
    fakes.write_catalog(c.store)
    return c


def _clip(ctx) -> ClipRecord:
    (rec,) = segment_video(ctx, "one.mp4")
    return rec


# ---- parsing ----------------------------------------------------------------------------
def test_caption_parser_is_tolerant_of_wrapping_but_strict_on_fields():
    good = fakes.GOOD["caption"]
    assert vlm.parse_captions(f"Sure! ```json\n{good}\n``` hope that helps")["en_long"][0].startswith("The person")
    assert vlm.parse_captions(good.replace('"en long"', '"en_long"'))["en_short"] == [
        "A person walks.",
        "Red top, bright room.",
    ]
    for bad in [
        "",
        "no json here",
        '{"en long": ["only one"]}',
        good.replace('"cn short"', '"x"'),
        '{"en long": [1, 2]}',
    ]:
        with pytest.raises(vlm.InvalidAnswer):
            vlm.parse_captions(bad)
    assert vlm.parse_verdict('{"pass": "yes"}')["pass"] is True
    assert vlm.parse_garment_type('{"garment_type": "Full-Body"}') == {"garment_type": "full"}
    with pytest.raises(vlm.InvalidAnswer):
        vlm.choice_parser(2)('{"choice": 2}')


# ---- captioning -------------------------------------------------------------------------
def test_caption_ok_and_cached(ctx, server):
    clip = _clip(ctx)
    rec = caption_clip(ctx, ClipRecord.from_json(clip.to_json()))
    assert rec.pending and rec.captions["dynamic"].startswith("The person walks")
    assert rec.captions["static"].startswith("A person in a red top")
    # the same clip again (x264 re-encodes are not bit-exact, so reuse the segmented clip):
    again = caption_clip(ctx, ClipRecord.from_json(clip.to_json()))  # answered from the cache, nothing paid
    assert again.captions == rec.captions and server.counts["caption"] == 1


@pytest.mark.parametrize(
    "script, attempts",
    [
        ([Reply(text="{not json")], 2),  # malformed, then good
        ([Reply(text='{"en long": ["a"]}')], 2),  # schema violation, then good
        ([Reply(text=fakes.GOOD["caption"], delay_s=3.0)], 2),  # timeout (2 s), then good
        ([Reply(status=503), Reply(status=429)], 3),  # transient HTTP errors
    ],
)
def test_caption_retries_then_succeeds(ctx, server, script, attempts):
    server.script["caption"] = list(script)
    rec = caption_clip(ctx, _clip(ctx))
    assert rec.pending and rec.captions["dynamic"]
    assert server.counts["caption"] == attempts


@pytest.mark.parametrize(
    "script, reason, requests",
    [
        ([Reply(text="{broken")] * 3, "caption:vlm_malformed", 3),
        ([Reply(refusal="I can't help with that.")], "caption:vlm_refused", 1),  # refusals are not retried
        ([Reply(text=None, finish_reason="content_filter")], "caption:vlm_refused", 1),
        ([Reply(status=400)], "caption:vlm_http", 1),  # the request is wrong: not retried
        ([Reply(status=500)] * 3, "caption:vlm_transport", 3),
    ],
)
def test_caption_failures_drop_with_reason(ctx, server, script, reason, requests):
    server.script["caption"] = list(script)
    rec = caption_clip(ctx, _clip(ctx))
    assert rec.status == "dropped" and rec.reason_kind == reason and rec.reason
    assert server.counts["caption"] == requests


def test_unreachable_endpoint_drops(ctx):
    cfg = ctx.cfg.model_copy(update={"vlm": ctx.cfg.vlm.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})})
    rec = caption_clip(Context(cfg), _clip(ctx))
    assert rec.reason_kind == "caption:vlm_transport" and "connection error" in rec.reason


# ---- garment extraction -------------------------------------------------------------------
def test_garment_retries_try_off_until_checks_pass(ctx, server):
    server.script["garment_textural"] = [Reply(text='{"pass": false, "reason": "logo missing"}')]
    rec = garment_clip(ctx, _clip(ctx))
    assert rec.pending and rec.scores["garment_tries"] == 2
    assert server.counts["try_off"] == 2 and server.counts["garment_semantic"] == 2
    assert ctx.get_image(rec.artifacts["garment"]).size[0] > 0


def test_garment_dropped_after_bounded_tries(ctx, server):
    server.script["garment_context"] = [Reply(text='{"pass": false, "reason": "hand visible"}')] * 5
    rec = garment_clip(ctx, _clip(ctx))
    assert rec.reason_kind == "garment:invalid_garment" and "hand visible" in rec.reason
    assert server.counts["try_off"] == 2  # max_tries


def test_garment_edit_endpoint_failures(ctx, server):
    server.script["try_off"] = [Reply(status=500)] * 6  # 3 transport attempts x 2 tries
    rec = garment_clip(ctx, _clip(ctx))
    assert rec.reason_kind == "garment:edit_failed"
    server.script["garment_semantic"] = [Reply(refusal="no")]
    rec = garment_clip(ctx, _clip(ctx))
    assert rec.reason_kind == "garment:vlm_refused"


# ---- reference construction ---------------------------------------------------------------
def test_reference_built_from_catalog_garment_of_same_type(ctx, server):
    server.script["garment_type"] = [Reply(text='{"garment_type": "lower"}')]
    rec = reference_clip(ctx, garment_clip(ctx, _clip(ctx)))
    assert rec.pending and rec.garment_type == "lower"
    assert rec.artifacts["catalog_garment"].startswith("garments/lower/")
    assert "reference" in rec.artifacts and server.counts["retrieve"] == 1


def test_reference_failures_drop_with_reason(ctx, server):
    base = garment_clip(ctx, _clip(ctx))
    server.script["garment_type"] = [Reply(text='{"garment_type": "hat"}')] * 3
    assert reference_clip(ctx, ClipRecord.from_json(base.to_json())).reason_kind == "reference:vlm_malformed"
    server.script["reference_check"] = [Reply(text='{"pass": false, "reason": "face changed"}')] * 3
    rec = reference_clip(ctx, ClipRecord.from_json(base.to_json()))
    assert rec.reason_kind == "reference:invalid_reference" and "face changed" in rec.reason
    assert server.counts["try_on"] == 3


def test_rate_limit_spaces_requests():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = vlm._RateLimiter(rate=4.0)
    for _ in range(3):
        lim.wait(sleep, lambda: now[0])
    assert slept == pytest.approx([0.25, 0.25])


def test_catalog_from_a_plain_folder(ctx, server, tmp_path):
    from PIL import Image

    for kind, name in [("upper", "a.png"), ("upper", "b.jpg"), ("lower", "c.png"), ("misc", "d.png")]:
        (tmp_path / "cat" / kind).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "cat" / kind / name)
    (tmp_path / "cat" / "upper" / "notes.txt").write_text("ignored")
    cfg = ctx.cfg.model_copy(
        update={
            "reference": ctx.cfg.reference.model_copy(update={"folder": tmp_path / "cat"}),
            "vlm": ctx.cfg.vlm.model_copy(update={"cache": False}),  # the same garment is typed twice below
        }
    )
    c2 = Context(cfg)
    _, catalog = c2.catalog
    assert {k: [g.key for g in v] for k, v in catalog.items()} == {
        "upper": ["upper/a.png", "upper/b.jpg"],
        "lower": ["lower/c.png"],
        "full": [],
    }
    rec = reference_clip(c2, garment_clip(c2, _clip(c2)))  # the fake answers "upper"
    assert rec.pending and rec.artifacts["catalog_garment"].startswith("upper/")
    server.script["garment_type"] = [Reply(text='{"garment_type": "full"}')]
    assert reference_clip(c2, garment_clip(c2, _clip(c2))).reason_kind == "reference:no_catalog_garment"
