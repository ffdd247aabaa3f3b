"""What the engine relies on in its dependencies, checked so an upgrade fails here, loudly.

`shared/models/dit.py` drives diffusers' `WanTransformer3DModel` blocks itself (it calls
`attn1.to_q/to_k/to_v`, `norm_q/norm_k`, `to_out`, `attn2(h, text, None, None)`, the condition
embedder's parts), and `shared/runtime/decode.py` runs `AutoencoderKLWan`'s decoder frame by
frame through its private causal-conv cache protocol (`_cached_conv_counts`, `decoder(x,
feat_cache=, feat_idx=, first_chunk=)`, `unpatchify`). None of that is public API, so
pyproject.toml pins diffusers to the minor versions tested; this file states every internal
the engine uses, on the tiny preset's real modules (CPU, random weights, about a second).

transformers is used through its public API only (`UMT5Config`, `UMT5EncoderModel`,
`AutoTokenizer`, `PreTrainedTokenizerFast`); its config fields are checked too.
"""

from __future__ import annotations

import inspect
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from shared.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PRESET = get_preset("tiny")


def _requirement(name: str) -> Requirement:
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _upgrade_hint(what: str) -> str:
    return (
        f"diffusers {metadata.version('diffusers')} changed {what}, which the engine relies on "
        "(shared/models/dit.py, shared/runtime/decode.py). Adapt the engine to the new diffusers, "
        "re-run the numerics tests, then move the pin in pyproject.toml."
    )


# ---- packaging ----------------------------------------------------------------------------


def test_requires_python_matches_what_the_code_uses():
    """StrEnum (shared/sessionbus, shared/jobs, shared/telemetry) and typing.Self need 3.11."""
    spec = PYPROJECT["project"]["requires-python"]
    assert re.fullmatch(r">=\s*3\.(\d+)", spec) and int(spec.split(".")[1]) >= 11, (
        f"requires-python is {spec!r}, but the code uses enum.StrEnum and typing.Self (Python 3.11)"
    )
    assert sys.version_info >= (3, 11)


@pytest.mark.parametrize("name", ["diffusers", "transformers"])
def test_engine_dependencies_have_a_tested_upper_bound_that_the_installed_version_meets(name):
    req = _requirement(name)
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
        f"{name} must be pinned to a tested range in pyproject.toml (it is {req})"
    )
    installed = metadata.version(name)
    assert req.specifier.contains(Version(installed), prereleases=True), (
        f"installed {name} {installed} is outside the tested range {req.specifier} of pyproject.toml"
    )


def test_diffusers_is_pinned_to_one_minor_version():
    """The engine reads private diffusers attributes, which change between minor versions."""
    spec = _requirement("diffusers").specifier
    lower = min(Version(s.version) for s in spec if s.operator in (">=", "==", "~="))
    assert not spec.contains(Version(f"{lower.major}.{lower.minor + 1}.0")), (
        f"diffusers pin {spec} admits the next minor version, whose internals are untested"
    )


# ---- diffusers: the DiT -------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**PRESET.dit.model_dump()).eval()


def test_wan_transformer_has_the_modules_the_in_context_forward_drives(transformer):
    top = ("patch_embedding", "condition_embedder", "blocks", "scale_shift_table", "norm_out", "proj_out")
    missing = [name for name in top if not hasattr(transformer, name)]
    assert not missing, _upgrade_hint(f"WanTransformer3DModel (no {missing})")
    emb = transformer.condition_embedder
    missing = [
        n for n in ("text_embedder", "timesteps_proj", "time_embedder", "time_proj", "act_fn") if not hasattr(emb, n)
    ]
    assert not missing, _upgrade_hint(f"WanTimeTextImageEmbedding (no {missing})")
    assert len(transformer.blocks) == PRESET.dit.num_layers
    block = transformer.blocks[0]
    missing = [
        n for n in ("scale_shift_table", "norm1", "norm2", "norm3", "attn1", "attn2", "ffn") if not hasattr(block, n)
    ]
    assert not missing, _upgrade_hint(f"WanTransformerBlock (no {missing})")
    assert tuple(block.scale_shift_table.shape) == (
        1,
        6,
        PRESET.dit.num_attention_heads * PRESET.dit.attention_head_dim,
    ), _upgrade_hint("the block's scale_shift_table layout (expected [1, 6, inner])")


def test_self_attention_projections_are_reachable_as_the_block_forward_uses_them(transformer):
    a1 = transformer.blocks[0].attn1
    missing = [n for n in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out", "heads") if not hasattr(a1, n)]
    assert not missing, _upgrade_hint(f"WanAttention (no {missing})")
    assert not getattr(a1, "fused_projections", False) or hasattr(a1, "to_qkv"), _upgrade_hint("fused projections")
    assert a1.heads == PRESET.dit.num_attention_heads
    assert len(a1.to_out) >= 2 and isinstance(a1.to_out[0], torch.nn.Linear), _upgrade_hint(
        "attn1.to_out (expected [Linear, Dropout])"
    )
    inner = PRESET.dit.num_attention_heads * PRESET.dit.attention_head_dim
    h = torch.randn(1, 4, inner)
    with torch.no_grad():
        q = a1.norm_q(a1.to_q(h))
        assert q.shape == (1, 4, inner), _upgrade_hint("attn1.norm_q over the full projected width")
        assert a1.to_out[1](a1.to_out[0](q)).shape == (1, 4, inner)


def test_cross_attention_takes_text_positionally(transformer):
    """dit.py calls `block.attn2(h, text, None, None)`: (hidden, encoder_hidden, mask, rotary)."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    params = list(inspect.signature(WanAttention.forward).parameters)[1:5]
    assert params == ["hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"], _upgrade_hint(
        f"WanAttention.forward's positional parameters (now {params})"
    )
    inner = PRESET.dit.num_attention_heads * PRESET.dit.attention_head_dim
    with torch.no_grad():
        out = transformer.blocks[0].attn2(torch.randn(1, 4, inner), torch.randn(1, 3, inner), None, None)
    assert out.shape == (1, 4, inner)


# ---- diffusers: the streaming VAE decode --------------------------------------------------


@pytest.fixture(scope="module")
def vae_module():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**PRESET.vae.diffusers_kwargs()).eval()


def test_decoder_conv_count_is_cached_under_the_name_the_streaming_decoder_reads(vae_module):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    counts = getattr(vae_module, "_cached_conv_counts", None)
    assert isinstance(counts, dict) and "decoder" in counts, _upgrade_hint("AutoencoderKLWan._cached_conv_counts")
    convs = sum(isinstance(m, WanCausalConv3d) for m in vae_module.decoder.modules())
    assert counts["decoder"] == convs, _upgrade_hint(
        "the meaning of _cached_conv_counts['decoder'] (one per causal conv)"
    )
    assert hasattr(vae_module, "post_quant_conv"), _upgrade_hint("AutoencoderKLWan.post_quant_conv")


def test_decoder_feat_cache_protocol(vae_module):
    """`decoder(x, feat_cache=, feat_idx=[0], first_chunk=)` on one latent frame walks the causal
    convs in a fixed order, each reading and replacing its slot of `feat_cache` (a list with one
    slot per causal conv): never past the list, the same walk every frame, slots None, the "Rep"
    marker (an upsampler's first frame) or a tensor, and no "Rep" left once frames followed."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d, unpatchify

    params = inspect.signature(WanDecoder3d.forward).parameters
    missing = [n for n in ("feat_cache", "feat_idx", "first_chunk") if n not in params]
    assert not missing, _upgrade_hint(f"WanDecoder3d.forward (no {missing} parameter)")
    assert list(inspect.signature(unpatchify).parameters)[:2] == ["x", "patch_size"], _upgrade_hint("unpatchify")

    n = vae_module._cached_conv_counts["decoder"]
    h, w = PRESET.latent_hw()
    x = vae_module.post_quant_conv(torch.randn(1, PRESET.vae.z_dim, 1, h, w))
    cache: list = [None] * n
    walks, outs = [], []
    with torch.no_grad():
        for frame in range(3):
            idx = [0]
            outs.append(vae_module.decoder(x, feat_cache=cache, feat_idx=idx, first_chunk=frame == 0))
            walks.append(idx[0])
            assert len(cache) == n, _upgrade_hint("feat_cache's length (the decoder grew or shrank the list)")
            kinds = {type(c).__name__ for c in cache}
            assert kinds <= {"NoneType", "str", "Tensor"} and all(
                c in (None, "Rep") for c in cache if isinstance(c, str)
            ), _upgrade_hint(f"what feat_cache slots hold ({sorted(kinds)})")
            if frame == 0:
                assert "Rep" in cache, _upgrade_hint("the 'Rep' marker of an upsampler's first frame")
    assert 0 < walks[0] <= n and len(set(walks)) == 1, _upgrade_hint(
        f"the decoder's feat_idx walk {walks} (cache size {n})"
    )
    assert "Rep" not in cache and all(isinstance(c, torch.Tensor) for c in cache[: walks[0]]), _upgrade_hint(
        "feat_cache after several frames (every visited conv holds its state)"
    )
    assert outs[0].shape[2] == 1 and outs[1].shape[2] == PRESET.vae.scale_factor_temporal, _upgrade_hint(
        "the decoder's frames per latent frame (1 for the first, 4 after)"
    )
    pixels = unpatchify(outs[1], patch_size=PRESET.vae.patch_size)
    s = PRESET.vae.scale_factor_spatial
    assert pixels.shape[1] == 3 and tuple(pixels.shape[-2:]) == (h * s, w * s), _upgrade_hint(
        "unpatchify's output layout"
    )


# ---- transformers -------------------------------------------------------------------------


def test_umt5_config_has_the_fields_the_text_encoder_reads():
    from transformers import UMT5Config, UMT5EncoderModel

    from shared.models.text_encoder import umt5_config

    config = umt5_config(PRESET.text_encoder)
    assert isinstance(config, UMT5Config)
    fields = (
        "d_model",
        "d_ff",
        "d_kv",
        "num_layers",
        "num_heads",
        "vocab_size",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "feed_forward_proj",
    )
    missing = [f for f in fields if not hasattr(config, f)]
    assert not missing, f"transformers {metadata.version('transformers')}: UMT5Config lost {missing}"
    params = inspect.signature(UMT5EncoderModel.forward).parameters
    assert "input_ids" in params and "attention_mask" in params
