"""umT5 text encoder wrapper: transformers' `UMT5EncoderModel` plus its tokenizer.

Prompts become a fixed-size context for the DiT's cross-attention, exactly as diffusers'
Wan pipelines build it: tokenize to `max_length` tokens (padding + truncation, `</s>` appended),
run the encoder with the attention mask, then zero every position past the prompt's real length.

Two tokenizer sources (`TextEncoderConfig.tokenizer`):
- "folder": the umT5 SentencePiece tokenizer read from a checkpoint's `tokenizer/` folder.
- "byte":   a byte-level tokenizer built in code (no download) for the small presets:
            ids 0..2 are `<pad>`, `</s>`, `<unk>`; byte b has id 3 + b.

Nothing here touches the network: every load is `local_files_only=True`.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from shared.models.presets import TextEncoderConfig
from shared.models.prompts import clean_prompt

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
BYTE_TOKEN_OFFSET = 3  # byte b -> token id 3 + b
BYTE_VOCAB_SIZE = BYTE_TOKEN_OFFSET + 256
_DEFAULT_MAX_LENGTH = TextEncoderConfig().max_length  # Wan2.2: 512 tokens


# ---- construction helpers ------------------------------------------------------------------
def umt5_config(cfg: TextEncoderConfig) -> UMT5Config:
    """The transformers `UMT5Config` of an encoder-only umT5 described by `cfg`."""
    return UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj=cfg.feed_forward_proj,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        architectures=["UMT5EncoderModel"],
    )


def build_byte_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: UTF-8 bytes -> ids 3..258, `</s>` appended.

    Bytes are mapped to printable characters by the GPT-2 byte-level alphabet and split one
    character per token, so every string (any script, emoji) encodes without `<unk>`. Saves and
    loads as a plain `tokenizer.json` through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 chars, one per byte value
    byte_to_char = {b: c for b, c in enumerate(_gpt2_byte_chars())}
    if set(byte_to_char.values()) != set(alphabet):
        raise RuntimeError("unexpected byte-level alphabet from the tokenizers library")
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    vocab.update({byte_to_char[b]: BYTE_TOKEN_OFFSET + b for b in range(256)})

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex("."), behavior="isolated"),  # one token per byte char
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )
    tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable char map, index = byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _config_from_umt5(config: UMT5Config, max_length: int) -> TextEncoderConfig:
    return TextEncoderConfig(
        d_model=config.d_model,
        d_ff=config.d_ff,
        d_kv=config.d_kv,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        vocab_size=config.vocab_size,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj=config.feed_forward_proj,
        max_length=max_length,
        tokenizer="folder",
    )


# ---- the wrapper ---------------------------------------------------------------------------
class TextEncoder:
    """umT5 encoder + tokenizer: prompts -> [B, max_length, d_model] cross-attention context."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: Any, config: TextEncoderConfig) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config

    # -- constructors --
    @classmethod
    def build(cls, cfg: TextEncoderConfig, seed: int | None = None) -> TextEncoder:
        """Random-init encoder for a preset (deterministic for a given `seed`; global RNG untouched).

        Only `tokenizer="byte"` configs can be built; a "folder" tokenizer (umT5 SentencePiece)
        must come from a checkpoint folder via `from_pretrained` (nothing is downloaded).
        """
        if cfg.tokenizer != "byte":
            raise ValueError(
                f"TextEncoderConfig.tokenizer={cfg.tokenizer!r}: the umT5 tokenizer must be loaded from a local "
                "checkpoint folder with TextEncoder.from_pretrained(text_encoder_dir, tokenizer_dir); "
                "build() only makes byte-level tokenizers and never downloads"
            )
        if cfg.vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"the byte tokenizer needs vocab_size >= {BYTE_VOCAB_SIZE}, got {cfg.vocab_size}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = UMT5EncoderModel(umt5_config(cfg))
        return cls(model, build_byte_tokenizer(cfg.max_length), cfg)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | PathLike[str],
        tokenizer_dir: str | PathLike[str],
        *,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """Load from local folders (diffusers Wan layout: `text_encoder/` and `tokenizer/`).

        `max_length` (tokens) defaults to the tokenizer's `model_max_length` when that is a real
        limit (our saved tokenizers), else 512 as in Wan2.2 (the umT5-XXL tokenizer sets none).
        """
        model = UMT5EncoderModel.from_pretrained(text_encoder_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if max_length is None:
            limit = getattr(tokenizer, "model_max_length", None)
            max_length = int(limit) if isinstance(limit, int) and 0 < limit <= 1_000_000 else _DEFAULT_MAX_LENGTH
        return cls(model, tokenizer, _config_from_umt5(model.config, max_length)).to(device, dtype)

    def save_pretrained(self, text_encoder_dir: str | PathLike[str], tokenizer_dir: str | PathLike[str]) -> None:
        """Write `config.json` + safetensors weights and the tokenizer files (`tokenizer.json`, ...)."""
        self.model.save_pretrained(text_encoder_dir)
        self.tokenizer.save_pretrained(tokenizer_dir)

    # -- properties --
    @property
    def max_length(self) -> int:
        """Context length in tokens (every `encode` output has this many positions)."""
        return self.config.max_length

    @property
    def dim(self) -> int:
        """Embedding width (d_model); the DiT's `text_dim`."""
        return self.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move/cast the encoder in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    # -- encoding --
    def tokenize(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (input_ids [B, max_length] int64, attention_mask [B, max_length] int64)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise ValueError("encode needs at least one prompt")
        out = self.tokenizer(
            [clean_prompt(p) for p in batch],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> context [B, max_length, d_model] in the encoder's dtype and device.

        Positions past each prompt's real length (tokens incl. `</s>`) are exactly zero, as in
        diffusers' Wan `_get_t5_prompt_embeds`. Over-long prompts are truncated to `max_length`.
        """
        input_ids, mask = self.tokenize(prompts)  # [B, L], [B, L]
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        return hidden.masked_fill(~mask.bool()[..., None], 0.0)  # [B, L, D], zeros past real tokens
