"""On-disk format of a preprocessed (latent) training set.

A dataset is a folder (or an object-store prefix with the same keys):

    index.json                      the `DatasetIndex` below (JSON)
    null_text.safetensors           `text`: encoder output of the empty prompt [max_length, text_dim]
    shards/shard-00000.safetensors  samples 0..k-1
    shards/shard-00001.safetensors  ...

Every shard is one safetensors file holding, for each sample `j` of the shard (zero-padded
six digits), tensors named `"{j:06d}/{field}"`:

    video        [C, f, h, w]   normalized VAE latents of the clip (f latent frames)
    reference    [C, 1, h, w]   the person image (wears a different garment than the video)
    garment      [C, 1, h, w]   the garment image, centre-padded to the video size
    text_full    [L_full, D]    umT5 output of "static caption + dynamic caption"
    text_dynamic [L_dyn, D]     umT5 output of the dynamic caption alone

Text embeddings are stored trimmed to the prompt's real length (diffusers' Wan encoding is exactly
zero past it) and zero-padded back to `text_max_length` when read, which keeps a 512-token umT5
context from dominating the shard size. Sample metadata (id, captions, frame counts) lives in
`index.json`, so a reader can plan its whole epoch without opening a shard.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

FORMAT_NAME = "fashionchameleon.latents"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
NULL_TEXT_FILE = "null_text.safetensors"
FIELDS = ("video", "reference", "garment", "text_full", "text_dynamic")


def shard_name(index: int) -> str:
    return f"shards/shard-{index:05d}.safetensors"


def tensor_key(slot: int, field: str) -> str:
    """Name of one sample's tensor inside its shard (`slot` = position within the shard)."""
    return f"{slot:06d}/{field}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SampleRecord(_Frozen):
    id: str
    latent_frames: int  # f of the video latents
    static_caption: str
    dynamic_caption: str


class ShardRecord(_Frozen):
    file: str  # relative to the dataset root, e.g. "shards/shard-00000.safetensors"
    bytes: int
    sha256: str
    samples: tuple[SampleRecord, ...]


class DatasetIndex(_Frozen):
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    preset: str
    encoder_id: str  # checkpoint id of the VAE + text encoder that made the latents
    height: int  # pixels of the encoded video / images
    width: int
    latent_channels: int
    latent_hw: tuple[int, int]
    text_dim: int
    text_max_length: int
    dtype: str  # storage dtype of latents and text, e.g. "float32", "bfloat16"
    shards: tuple[ShardRecord, ...] = Field(default_factory=tuple)

    @property
    def num_samples(self) -> int:
        return sum(len(s.samples) for s in self.shards)

    def check_compatible(self, latent_channels: int, latent_hw: tuple[int, int], text_dim: int) -> None:
        """Raise ValueError unless these latents fit a DiT of this geometry."""
        if self.format != FORMAT_NAME or self.version != FORMAT_VERSION:
            raise ValueError(f"dataset format {self.format} v{self.version} is not {FORMAT_NAME} v{FORMAT_VERSION}")
        got = (self.latent_channels, tuple(self.latent_hw), self.text_dim)
        want = (latent_channels, tuple(latent_hw), text_dim)
        if got != want:
            raise ValueError(f"dataset latents (channels, hw, text_dim)={got} do not fit the model's {want}")
