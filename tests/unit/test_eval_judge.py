"""The VLM judge against a real HTTP server on 127.0.0.1 speaking chat-completions (and
Gemini's generateContent): good, fenced, malformed, out-of-range and refused answers, HTTP
failures, repeats, interactive segments. Scripted answers, no model."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from services.eval.config import JudgeConfig
from services.eval.judge import SYSTEM_PROMPT, InvalidAnswer, Judge, judge_metrics, parse_scores
from services.eval.metrics.base import SampleVideo, Segment

GOOD = {"high-level garment consistency": 5, "low-level garment consistency": 4, "non-target garment preservation": 3}


def chat(content=None, refusal=None, finish="stop") -> dict:
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish,
            }
        ]
    }


def scores(h, l, n) -> str:  # noqa: E741
    return json.dumps(
        {"high-level garment consistency": h, "low-level garment consistency": l, "non-target garment preservation": n}
    )


class FakeServer:
    """Answers POSTs from a script of (status, body, headers); the last entry repeats."""

    def __init__(self) -> None:
        self.script: list[tuple[int, object, dict]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "json": json.loads(body),
                    }
                )
                status, payload, headers = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def answer(self, *entries) -> None:
        """Each entry: a chat() dict (200), or (status, body[, headers])."""
        self.script = [
            (200, e, {}) if isinstance(e, dict) else (e[0], e[1], e[2] if len(e) > 2 else {}) for e in entries
        ]
        self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def config(server: FakeServer, **kw) -> JudgeConfig:
    base = dict(
        provider="openai",
        base_url=server.url,
        model="judge-vl",
        api_key=SecretStr("sk-test"),
        repeats=1,
        max_attempts=3,
        backoff_s=0.0,
        frames=4,
        timeout_s=5,
    )
    return JudgeConfig(**{**base, **kw})


def img(color, size=(48, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


FRAMES = np.zeros((6, 32, 48, 3), np.uint8)


def judge(cfg, sleeps=None):
    return Judge(cfg, sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def run(j: Judge):
    return j.judge(img("red"), img("blue"), FRAMES)


def test_good_answers_are_averaged_over_repeats_and_the_request_is_well_formed(server):
    server.answer(chat(scores(5, 4, 3)), chat(scores(4, 4, 4)), chat(scores(3, 4, 5)))
    j = run(judge(config(server, repeats=3)))
    assert j.scores == {"judge_hgc": 4.0, "judge_lgc": 4.0, "judge_ntp": 4.0}
    assert j.valid == 3 and [r.attempts for r in j.repeats] == [1, 1, 1]
    assert len(server.requests) == 3
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    body = req["json"]
    assert body["model"] == "judge-vl"
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    parts = body["messages"][1]["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(images) == 2 + 4  # reference, garment, 4 frames
    for url in images:
        assert url.startswith("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).format == "JPEG"
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert texts[0].startswith("[Image 1]") and texts[1].startswith("[Image 2]") and texts[2].startswith("[Video 1]")
    schema = body["response_format"]["json_schema"]["schema"]
    assert set(schema["required"]) == set(GOOD)


def test_fenced_and_chatty_answers_are_parsed(server):
    fenced = "Sure, here you go:\n```json\n" + scores(4, 3, 5) + "\n```\nLet me know if you need more."
    chatty = (
        'Final scores: {"High_Level_Garment_Consistency": "4", "low level garment consistency": 2.5, "NTP": "5/5"}'
        " -- done"
    )
    server.answer(chat(fenced), chat(chatty))
    j = run(judge(config(server, repeats=2)))
    assert [r.scores for r in j.repeats] == [
        {"judge_hgc": 4, "judge_lgc": 3, "judge_ntp": 5},
        {"judge_hgc": 4, "judge_lgc": 2.5, "judge_ntp": 5},
    ]
    assert len(server.requests) == 2  # no retries were needed


def test_malformed_answer_is_retried(server):
    server.answer(
        chat("The garment looks great, I'd say five."),
        chat('{"high-level garment consistency": 5}'),
        chat(scores(2, 2, 2)),
    )
    j = run(judge(config(server)))
    assert j.scores == {"judge_hgc": 2, "judge_lgc": 2, "judge_ntp": 2}
    assert j.repeats[0].attempts == 3 and len(server.requests) == 3


def test_out_of_range_answers_are_retried_then_recorded_missing_never_zero(server):
    server.answer(chat(scores(0, 3, 3)), chat(scores(4, 7, 3)), chat(scores(4, 3, -1)))
    cfg = config(server)
    video = SampleVideo("s", FRAMES, 24.0, img("red"), "walks", [Segment(0, 6, img("blue"), "g.png")])
    results = {r.key: r for r in judge_metrics(judge(cfg), video)}
    assert len(server.requests) == 3
    for key in ("judge_hgc", "judge_lgc", "judge_ntp"):
        assert results[key].status == "missing" and results[key].value is None
        assert "outside [1, 5]" in results[key].reason and "gave up after 3 attempts" in results[key].reason


def test_refusal_is_recorded_missing_without_retry(server):
    server.answer(chat(refusal="I can't evaluate images of people."))
    j = run(judge(config(server, repeats=2)))
    assert j.scores == {"judge_hgc": None, "judge_lgc": None, "judge_ntp": None}
    assert len(server.requests) == 2  # one per repeat, none retried
    assert all(r.reason.startswith("refused: I can't") and r.attempts == 1 for r in j.repeats)
    server.answer(chat(content=None, finish="content_filter"))
    assert run(judge(config(server))).repeats[0].reason == "refused: finish_reason content_filter"


def test_one_refused_repeat_leaves_the_others_averaged(server):
    server.answer(chat(scores(5, 5, 5)), chat(refusal="no"), chat(scores(3, 3, 3)))
    j = run(judge(config(server, repeats=3)))
    assert j.valid == 2 and j.scores["judge_hgc"] == 4.0


def test_transient_http_errors_are_retried_honouring_retry_after(server):
    sleeps: list[float] = []
    server.answer(
        (503, {"error": "overloaded"}, {"Retry-After": "2"}), (429, {"error": "slow down"}), chat(scores(4, 4, 4))
    )
    j = judge(config(server, backoff_s=0.5, max_attempts=3), sleeps).judge(img("red"), img("blue"), FRAMES)
    assert j.scores["judge_hgc"] == 4 and len(server.requests) == 3
    assert sleeps == [2.0, 1.0]  # Retry-After, then backoff_s * 2**1


def test_client_errors_are_not_retried(server):
    server.answer((400, {"error": {"message": "response_format not supported"}}))
    j = run(judge(config(server, max_attempts=5)))
    assert len(server.requests) == 1
    assert j.repeats[0].reason.startswith("HTTP 400") and j.scores["judge_hgc"] is None


def test_unreachable_endpoint_is_missing_after_retries():
    s = FakeServer()
    url = s.url
    s.close()  # nothing listens there any more
    cfg = JudgeConfig(provider="openai", base_url=url, model="m", max_attempts=2, backoff_s=0.0, repeats=1, timeout_s=2)
    j = Judge(cfg, sleep=lambda s: None).judge(img("red"), img("blue"), FRAMES)
    assert j.scores["judge_hgc"] is None and "connection error" in j.repeats[0].reason


def test_gemini_generate_content_shape(server):
    cfg = config(server, provider="gemini", model="gemini-3.0-pro")
    server.answer(
        {
            "candidates": [
                {"content": {"parts": [{"text": "```json\n" + scores(5, 4, 4) + "\n```"}]}, "finishReason": "STOP"}
            ]
        }
    )
    j = run(judge(cfg))
    assert j.scores == {"judge_hgc": 5, "judge_lgc": 4, "judge_ntp": 4}
    req = server.requests[0]
    assert req["path"] == "/v1/models/gemini-3.0-pro:generateContent"
    assert req["headers"]["x-goog-api-key"] == "sk-test" and "authorization" not in req["headers"]
    body = req["json"]
    assert body["systemInstruction"]["parts"][0]["text"] == SYSTEM_PROMPT
    inline = [p["inlineData"] for p in body["contents"][0]["parts"] if "inlineData" in p]
    assert len(inline) == 6 and all(p["mimeType"] == "image/jpeg" for p in inline)
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    server.answer({"promptFeedback": {"blockReason": "SAFETY"}})
    blocked = run(judge(cfg))
    assert blocked.repeats[0].reason == "refused: prompt blocked: SAFETY" and len(server.requests) == 1
    server.answer({"candidates": [{"finishReason": "SAFETY"}]})
    assert run(judge(cfg)).repeats[0].reason == "refused: finishReason SAFETY"


def test_interactive_sample_is_judged_per_segment(server):
    server.answer(chat(scores(5, 5, 5)), chat(scores(3, 2, 4)))
    video = SampleVideo(
        "s",
        np.zeros((12, 32, 48, 3), np.uint8),
        24.0,
        img("red"),
        "walks",
        [Segment(0, 9, img("blue"), "a.png"), Segment(9, 12, img("green"), "b.png")],
    )
    results = {r.key: r for r in judge_metrics(judge(config(server)), video)}
    assert results["judge_hgc"].value == 4.0 and results["judge_hgc"].details["per_segment"] == [5, 3]
    assert results["judge_lgc"].value == 3.5 and results["judge_ntp"].value == 4.5
    segs = results["judge_hgc"].details["segments"]
    assert [(s["start_frame"], s["end_frame"], s["garment"]) for s in segs] == [(0, 9, "a.png"), (9, 12, "b.png")]
    # each segment's request shows its own garment (Image 2) and only its own frames
    garments = []
    for req in server.requests:
        urls = [p["image_url"]["url"] for p in req["json"]["messages"][1]["content"] if p["type"] == "image_url"]
        g = Image.open(io.BytesIO(base64.b64decode(urls[1].split(",", 1)[1]))).convert("RGB").getpixel((5, 5))
        garments.append(g)
        assert len(urls) == 2 + (4 if len(garments) == 1 else 3)
    assert garments[0][2] > 200 and garments[1][1] > 100  # blue, then green


@pytest.mark.parametrize(
    "text,expected",
    [
        (scores(1, 2, 3), (1, 2, 3)),
        ('{"hgc": 4, "lgc": "3.5", "ntp": "5/5"}', (4, 3.5, 5)),
        (
            'noise {"a": 1} then {"high level garment consistency":2,"low-level garment consistency":2,'
            '"non_target_garment_preservation":2}',
            (2, 2, 2),
        ),
    ],
)
def test_parse_scores_accepts(text, expected):
    s = parse_scores(text)
    assert (s["judge_hgc"], s["judge_lgc"], s["judge_ntp"]) == expected


@pytest.mark.parametrize(
    "text,kind",
    [
        ("", "malformed"),
        ("five, four, three", "malformed"),
        ('{"high-level garment consistency": 5, "low-level garment consistency": 4}', "malformed"),
        (
            '{"high-level garment consistency": true, "low-level garment consistency": 4, '
            '"non-target garment preservation": 3}',
            "malformed",
        ),
        (
            '{"high-level garment consistency": "good", "low-level garment consistency": 4, '
            '"non-target garment preservation": 3}',
            "malformed",
        ),
        (scores(5, 4, 6), "out_of_range"),
        (scores(0, 4, 3), "out_of_range"),
    ],
)
def test_parse_scores_rejects(text, kind):
    with pytest.raises(InvalidAnswer) as e:
        parse_scores(text)
    assert e.value.kind == kind
