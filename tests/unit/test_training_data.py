"""Training data on the tiny preset: preprocessing into shards, the index, streaming order,
rank splits, resume positions and the object-store mirror."""

from __future__ import annotations

import json

import pytest
import torch

from shared.models.checkpoint import build_random
from shared.models.presets import get_preset
from shared.storage.config import LocalStoreConfig
from shared.storage.local import LocalObjectStore
from training.data.dataset import (
    EpochOrder,
    LatentDataset,
    SampleRef,
    SampleStream,
    ShardSource,
    collate,
)
from training.data.format import INDEX_FILE, DatasetIndex
from training.data.preprocess import (
    _video_pixels,
    preprocess,
    upload_dataset,
    usable_pixel_frames,
)
from training.data.synthetic import synthetic_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoded(one_torch_thread, tmp_path_factory):
    preset = get_preset("tiny")
    comps = build_random(preset, seed=0, parts=frozenset({"vae", "text_encoder"}))
    samples = synthetic_samples(5, 96, 128, pixel_frames=23, seed=3)  # 23 pixel frames -> cut to 21
    out = tmp_path_factory.mktemp("data")
    index = preprocess(samples, comps, out, samples_per_shard=2, dtype="float32")
    return out, index, comps, samples


def test_index_and_shards(encoded):
    out, index, _, samples = encoded
    on_disk = DatasetIndex.model_validate_json((out / INDEX_FILE).read_text())
    assert on_disk == index
    assert index.num_samples == 5 and [len(s.samples) for s in index.shards] == [2, 2, 1]
    assert all(s.latent_frames == 6 for sh in index.shards for s in sh.samples)  # 21 pixel -> 6 latent frames
    assert index.latent_channels == 8 and tuple(index.latent_hw) == (6, 8) and index.text_dim == 32
    assert index.shards[0].samples[1].dynamic_caption == samples[1].dynamic_caption
    assert usable_pixel_frames(23, 81) == 21 and usable_pixel_frames(100, 81) == 81


def test_sample_tensors_match_the_encoders(encoded):
    out, _, comps, samples = encoded
    ds = LatentDataset.from_folder(out)
    s = ds.load(SampleRef(1, 0))
    raw = samples[2]  # shard 1 slot 0 is the third sample
    assert s["id"] == raw.id
    video = comps.vae.encode_video(_video_pixels(raw.video, 96, 128, 21))[0]
    torch.testing.assert_close(s["video"], video)
    text = comps.text_encoder.encode([raw.full_caption, raw.dynamic_caption])
    torch.testing.assert_close(s["text_full"], text[0])  # trimmed on disk, padded back on read
    torch.testing.assert_close(s["text_dynamic"], text[1])
    assert s["reference"].shape == s["garment"].shape == (8, 1, 6, 8)
    assert ds.null_text().shape == (32, 32)
    batch = collate([s, s])
    assert batch["video"].shape == (2, 8, 6, 6, 8) and batch["text_full"].shape == (2, 32, 32)


def test_epoch_order_is_a_deterministic_permutation():
    eligible = [[0, 1], [0, 1, 2], [], [1]]  # shard 2 has no long-enough sample
    order = EpochOrder(eligible, seed=5)
    n = order.epoch_size
    assert n == 6
    for epoch in range(3):
        refs = [order.locate(epoch * n + i) for i in range(n)]
        assert sorted((r.shard, r.slot) for r in refs) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (3, 1)]
    epochs = [[order.locate(e * n + i) for i in range(n)] for e in range(3)]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2], "epochs reshuffle"
    again = EpochOrder(eligible, seed=5)
    assert [again.locate(i) for i in range(2 * n)] == [order.locate(i) for i in range(2 * n)]
    plain = EpochOrder(eligible, seed=5, shuffle=False)
    assert [(r.shard, r.slot) for r in (plain.locate(i) for i in range(n))] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (1, 2),
        (3, 1),
    ]


def test_ranks_split_the_global_batch_and_resume_by_position(encoded):
    out = encoded[0]
    ds = LatentDataset.from_folder(out)
    single = SampleStream(ds, seed=1, per_rank=4, latent_frames=3)
    ranks = [SampleStream(ds, seed=1, per_rank=2, rank=r, world_size=2, latent_frames=3) for r in range(2)]
    for _ in range(3):
        samples, positions = single.next_batch()
        split = [s.next_batch() for s in ranks]
        assert positions == split[0][1] + split[1][1]
        assert [x["id"] for x in samples] == [x["id"] for part in split for x in part[0]]
        assert samples[0]["video"].shape[1] == 3
    resumed = SampleStream(ds, seed=1, per_rank=4, latent_frames=3)
    resumed.load_state_dict(json.loads(json.dumps(single.state_dict())))
    a, b = single.next_batch(), resumed.next_batch()
    assert a[1] == b[1] and [x["id"] for x in a[0]] == [x["id"] for x in b[0]]


def test_object_store_mirror(encoded, tmp_path):
    out = encoded[0]
    store = LocalObjectStore(LocalStoreConfig(root=tmp_path / "store"))
    store.ensure_bucket()
    assert upload_dataset(out, store, "datasets/tiny") == 3 + 2
    source = ShardSource(store=store, prefix="datasets/tiny", cache_dir=tmp_path / "cache")
    remote, local = LatentDataset(source), LatentDataset.from_folder(out)
    ref = EpochOrder(local.eligible, seed=0).locate(3)
    torch.testing.assert_close(remote.load(ref)["video"], local.load(ref)["video"], rtol=0, atol=0)
    assert (tmp_path / "cache" / remote.index.shards[ref.shard].file).is_file()


def test_min_latent_frames_filters(encoded):
    with pytest.raises(ValueError, match="latent frames"):
        LatentDataset.from_folder(encoded[0], min_latent_frames=7)
