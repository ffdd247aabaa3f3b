"""Streaming reader of preprocessed shards with a deterministic, resumable sample order.

Order: every epoch shuffles the shard order and, inside each shard, the sample order (seeded by
(seed, epoch)), so a reader touches one shard at a time. The stream is global: position p is the
p-th sample since the start of training, whatever the number of ranks. A trainer that consumes
G = world x batch x accumulation samples per step takes global positions [step * G, (step + 1) * G)
and each rank reads its own slice, so the data a step sees does not depend on how it is split
across processes, and resuming at a step needs nothing but the step.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import IterableDataset

from shared.storage.base import ObjectStore

from .format import INDEX_FILE, NULL_TEXT_FILE, DatasetIndex, tensor_key


class ShardSource:
    """Where shards live: a local folder, or an object-store prefix mirrored into `cache_dir`."""

    def __init__(
        self,
        root: str | Path | None = None,
        store: ObjectStore | None = None,
        prefix: str = "",
        cache_dir: str | Path | None = None,
    ):
        if (root is None) == (store is None):
            raise ValueError("give either a local dataset folder or an object store")
        if store is not None and cache_dir is None:
            raise ValueError("reading from an object store needs a local cache_dir")
        self.root = Path(root) if root is not None else Path(cache_dir)
        self.store = store
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""

    def read_index(self) -> DatasetIndex:
        if self.store is not None:
            return DatasetIndex.model_validate_json(self.store.get_bytes(self.prefix + INDEX_FILE))
        return DatasetIndex.model_validate_json((self.root / INDEX_FILE).read_text())

    def path(self, name: str, sha256: str | None = None) -> Path:
        """Local path of a dataset file, downloading (and checking its sha256) on first use."""
        local = self.root / name
        if self.store is not None and not local.exists():
            self.store.get_file(self.prefix + name, local)
            if sha256 is not None and hashlib.sha256(local.read_bytes()).hexdigest() != sha256:
                local.unlink()
                raise OSError(f"{name}: checksum mismatch after download")
        return local


@dataclass(frozen=True)
class SampleRef:
    shard: int
    slot: int


class LatentDataset:
    """Random access to the samples of a preprocessed dataset (shards opened lazily, LRU-kept)."""

    def __init__(self, source: ShardSource, min_latent_frames: int = 1, open_shards: int = 2):
        self.source = source
        self.index = source.read_index()
        self.min_latent_frames = min_latent_frames
        # Eligible slots per shard: samples long enough for the training clip.
        self.eligible: list[list[int]] = [
            [j for j, s in enumerate(shard.samples) if s.latent_frames >= min_latent_frames]
            for shard in self.index.shards
        ]
        if not any(self.eligible):
            raise ValueError(f"no sample in {source.root} has >= {min_latent_frames} latent frames")
        self._open: OrderedDict[int, object] = OrderedDict()
        self._max_open = open_shards

    @classmethod
    def from_folder(cls, root: str | Path, min_latent_frames: int = 1) -> LatentDataset:
        return cls(ShardSource(root=root), min_latent_frames)

    def __len__(self) -> int:
        return sum(len(e) for e in self.eligible)

    def _shard(self, i: int):
        handle = self._open.get(i)
        if handle is None:
            rec = self.index.shards[i]
            handle = safe_open(str(self.source.path(rec.file, rec.sha256)), framework="pt")
            self._open[i] = handle
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(i)
        return handle

    def _pad_text(self, text: torch.Tensor) -> torch.Tensor:
        """[len, D] -> [text_max_length, D], zero past the prompt (as the encoder returns it)."""
        out = text.new_zeros(self.index.text_max_length, text.shape[1])
        n = min(text.shape[0], out.shape[0])
        out[:n] = text[:n]
        return out

    def load(self, ref: SampleRef, latent_frames: int | None = None) -> dict:
        """One sample: video [C, F, h, w] (the first `latent_frames`), reference/garment [C, 1, h, w],
        text_full/text_dynamic [text_max_length, D], plus "id". Tensors in the storage dtype."""
        shard = self._shard(ref.shard)
        get = lambda field: shard.get_tensor(tensor_key(ref.slot, field))
        video = get("video")
        if latent_frames is not None:
            if video.shape[1] < latent_frames:
                raise ValueError(f"sample has {video.shape[1]} latent frames, {latent_frames} asked")
            video = video[:, :latent_frames]  # the first frames: the reference is the clip's start
        return {
            "id": self.index.shards[ref.shard].samples[ref.slot].id,
            "video": video,
            "reference": get("reference"),
            "garment": get("garment"),
            "text_full": self._pad_text(get("text_full")),
            "text_dynamic": self._pad_text(get("text_dynamic")),
        }

    def null_text(self) -> torch.Tensor:
        """Encoder output of the empty prompt, [text_max_length, D] (for classifier-free guidance)."""
        with safe_open(str(self.source.path(NULL_TEXT_FILE)), framework="pt") as f:
            return self._pad_text(f.get_tensor("text"))


class EpochOrder:
    """Global sample order: shard order and within-shard order shuffled per epoch."""

    def __init__(self, eligible: list[list[int]], seed: int, shuffle: bool = True):
        self.eligible = eligible
        self.seed = seed
        self.shuffle = shuffle
        self.epoch_size = sum(len(e) for e in eligible)
        self._cache: dict[int, tuple[list[int], list[int]]] = {}

    def _generator(self, *key: int) -> torch.Generator:
        digest = hashlib.blake2b(":".join(map(str, (self.seed, *key))).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, cumulative eligible counts along it) of one epoch (memoised)."""
        if epoch not in self._cache:
            shards = [i for i, e in enumerate(self.eligible) if e]
            if self.shuffle:
                shards = [shards[i] for i in torch.randperm(len(shards), generator=self._generator(epoch))]
            ends, total = [], 0
            for s in shards:
                total += len(self.eligible[s])
                ends.append(total)
            self._cache = {epoch: (shards, ends)}  # one epoch at a time
        return self._cache[epoch]

    def locate(self, position: int) -> SampleRef:
        epoch, offset = divmod(position, self.epoch_size)
        shards, ends = self._epoch(epoch)
        k = bisect.bisect_right(ends, offset)
        shard = shards[k]
        within = offset - (ends[k - 1] if k else 0)
        slots = self.eligible[shard]
        if self.shuffle:
            perm = torch.randperm(len(slots), generator=self._generator(epoch, shard))
            return SampleRef(shard, slots[int(perm[within])])
        return SampleRef(shard, slots[within])


class SampleStream(IterableDataset):
    """This rank's samples from global position `start` on, in steps of `global_batch`.

    Within each global batch of `world_size * per_rank` samples, rank r takes the contiguous slice
    [r * per_rank, (r + 1) * per_rank). `position` is the global position of the next batch.
    """

    def __init__(
        self,
        dataset: LatentDataset,
        *,
        seed: int,
        per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        latent_frames: int | None = None,
        shuffle: bool = True,
        start: int = 0,
    ):
        self.dataset = dataset
        self.order = EpochOrder(dataset.eligible, seed, shuffle)
        self.per_rank, self.rank, self.world_size = per_rank, rank, world_size
        self.latent_frames = latent_frames
        self.position = start

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size

    def next_batch(self) -> tuple[list[dict], list[int]]:
        """This rank's samples of the next global batch and their global positions."""
        first = self.position + self.rank * self.per_rank
        positions = list(range(first, first + self.per_rank))
        samples = [self.dataset.load(self.order.locate(p), self.latent_frames) for p in positions]
        self.position += self.global_batch
        return samples, positions

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def collate(samples: list[dict], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Stack samples: video [B, C, F, h, w], reference/garment [B, C, 1, h, w], texts [B, L, D]."""
    out = {"id": [s["id"] for s in samples]}
    for field in ("video", "reference", "garment", "text_full", "text_dynamic"):
        out[field] = torch.stack([s[field] for s in samples]).to(device=device, dtype=dtype)
    return out
