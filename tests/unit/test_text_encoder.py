"""CPU unit tests for the umT5 text-encoder wrapper on the `tiny` preset (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from shared.models.presets import get_preset
from shared.models.prompts import prompt_key, validate_prompt
from shared.models.text_encoder import TextEncoder

CFG = get_preset("tiny").text_encoder
PROMPTS = ["a woman in a red dress walks forward", "a man turns around slowly"]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.build(CFG, seed=0)


def _real_lengths(enc: TextEncoder, prompts: list[str]) -> list[int]:
    _, mask = enc.tokenize(prompts)
    return mask.sum(dim=1).tolist()


def test_build_is_deterministic_for_a_seed() -> None:
    a, b, c = TextEncoder.build(CFG, seed=3), TextEncoder.build(CFG, seed=3), TextEncoder.build(CFG, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.encode(PROMPTS), b.encode(PROMPTS))


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TextEncoder.build(CFG, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_encode_shape_and_properties(encoder: TextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    assert out.shape == (2, CFG.max_length, CFG.d_model)
    assert out.dtype == torch.float32
    assert encoder.max_length == CFG.max_length and encoder.dim == CFG.d_model
    assert encoder.encode("single prompt").shape == (1, CFG.max_length, CFG.d_model)


def test_padding_is_exactly_zero_and_real_tokens_are_not(encoder: TextEncoder) -> None:
    prompts = ["hi", "a longer prompt here"]
    out = encoder.encode(prompts)
    lengths = _real_lengths(encoder, prompts)
    assert lengths == [len(p.encode()) + 1 for p in prompts]  # bytes + </s>
    for row, n in zip(out, lengths):
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(dim=-1) > 0)


def test_batch_matches_single_prompts(encoder: TextEncoder) -> None:
    batch = encoder.encode(PROMPTS)
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(batch[i], encoder.encode(p)[0])


def test_different_prompts_differ(encoder: TextEncoder) -> None:
    out = encoder.encode(["a red dress", "a blue coat"])
    assert not torch.allclose(out[0], out[1])


def test_save_load_round_trip(encoder: TextEncoder, tmp_path: Path) -> None:
    te_dir, tok_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    encoder.save_pretrained(te_dir, tok_dir)
    assert (tok_dir / "tokenizer.json").is_file() and (te_dir / "config.json").is_file()

    loaded = TextEncoder.from_pretrained(te_dir, tok_dir)
    assert loaded.max_length == CFG.max_length and loaded.dim == CFG.d_model
    assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))

    # The folders are ordinary HF checkpoints.
    model = UMT5EncoderModel.from_pretrained(te_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    short = "a red dress"  # fits max_length untruncated
    ids = tok(short, return_tensors="pt").input_ids
    ref_ids, _ = encoder.tokenize(short)
    assert torch.equal(ids[0], ref_ids[0, : ids.shape[1]])
    assert tok.decode(ids[0], skip_special_tokens=True) == short
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, encoder.model(input_ids=ids).last_hidden_state)


def test_from_pretrained_casts_dtype(encoder: TextEncoder, tmp_path: Path) -> None:
    encoder.save_pretrained(tmp_path / "te", tmp_path / "tok")
    loaded = TextEncoder.from_pretrained(tmp_path / "te", tmp_path / "tok", dtype=torch.bfloat16)
    out = loaded.encode(PROMPTS)
    assert out.dtype == torch.bfloat16 and out.shape == (2, CFG.max_length, CFG.d_model)


@pytest.mark.parametrize("prompt", ["红色连衣裙，慢慢转身", "dress 👗👩🏽‍🦱 ✨", "naïve café"])
def test_unicode_prompts_encode_bytewise(encoder: TextEncoder, prompt: str) -> None:
    ids, mask = encoder.tokenize(prompt)
    n = min(len(prompt.encode("utf-8")) + 1, CFG.max_length)
    assert int(mask.sum()) == n
    assert 2 not in ids[0, :n].tolist()  # no <unk>
    out = encoder.encode(prompt)
    assert torch.isfinite(out).all() and out.shape == (1, CFG.max_length, CFG.d_model)


def test_overlong_prompt_is_truncated(encoder: TextEncoder) -> None:
    ids, mask = encoder.tokenize("x" * (10 * CFG.max_length))
    assert ids.shape == (1, CFG.max_length) and int(mask.sum()) == CFG.max_length
    assert ids[0, -1].item() == encoder.tokenizer.eos_token_id
    out = encoder.encode("x" * (10 * CFG.max_length))
    assert out.shape == (1, CFG.max_length, CFG.d_model)
    assert torch.all(out[0].abs().sum(dim=-1) > 0)


def test_build_with_folder_tokenizer_raises() -> None:
    cfg = CFG.model_copy(update={"tokenizer": "folder"})
    with pytest.raises(ValueError, match="checkpoint folder"):
        TextEncoder.build(cfg, seed=0)


def test_build_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder.build(CFG.model_copy(update={"vocab_size": 100}), seed=0)


def test_validate_prompt_accepts_and_strips() -> None:
    assert validate_prompt("  a red dress\n") == "a red dress"
    assert validate_prompt("line one\nline two\tend") == "line one\nline two\tend"
    assert validate_prompt("👩🏽‍🦱 红色") == "👩🏽‍🦱 红色"  # zero-width joiner (format char) is fine
    assert validate_prompt("x" * 10, max_chars=10) == "x" * 10


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * 11, "limit is 10"),
        ("a\x00b", "NUL"),
        ("a\x07b", "control character U\\+0007"),
        ("a\x1bb", "control character"),
        ("a\ud800b", "surrogate"),
    ],
)
def test_validate_prompt_rejects(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_prompt(prompt, max_chars=10)


def test_validate_prompt_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="string"):
        validate_prompt(b"bytes")  # type: ignore[arg-type]


def test_prompt_key() -> None:
    key = prompt_key("a red dress", "tiny")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == prompt_key("a red dress", "tiny")
    assert key == prompt_key("  a   red dress ", "tiny")  # same cleaned text -> same embedding -> same key
    assert key != prompt_key("a red dress", "small")
    assert key != prompt_key("a blue dress", "tiny")
    assert prompt_key("ab", "c") != prompt_key("b", "ca")  # no concatenation ambiguity
