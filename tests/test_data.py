import io
import tarfile
from collections import Counter

import pytest
import torch
from data_prep.precompute_features import precompute
from data_prep.synthetic import make_pair, write_split

from fromage.config import DataConfig, compose
from fromage.data import CaptionDataModule, check_every_rank_has_shards, shard_list
from fromage.lit import FromageLitModule
from fromage.model import FromageModel
from fromage.tokens import add_ret_token
from tiny import make_tokenizer, tiny_clip_tower, tiny_fromage, tiny_timm_tower


def data_module(train_dir, batch_size=4, num_workers=0, shuffle_buffer=0, max_len=24):
    tokenizer = make_tokenizer()
    ret_id = add_ret_token(tokenizer)
    config = DataConfig(
        train_shards=str(train_dir),
        val_shards=None,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        max_len=max_len,
    )
    return CaptionDataModule(config, tokenizer, ret_id, tiny_clip_tower().preprocess)


def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(tmp_path, monkeypatch):
    write_split(tmp_path, n=40, per_shard=5, seed=0)  # 8 shards
    seen = Counter()
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = data_module(tmp_path, num_workers=2, shuffle_buffer=8).train_dataloader()
        for batch in loader:
            seen.update(batch.keys)
    all_keys = {f"{s:05d}{i:04d}" for s in range(8) for i in range(5)}
    assert set(seen) == all_keys
    assert set(seen.values()) == {1}


def add_to_shard(path, samples):
    """Append raw samples (key, {ext: bytes}) to an existing tar shard."""
    with tarfile.open(path, "a") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_image_and_empty_captions_are_skipped_and_counted(tmp_path):
    (shard,) = write_split(tmp_path, n=6, per_shard=6, seed=0)
    image, _, _ = make_pair(__import__("random").Random(1))
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    add_to_shard(
        shard,
        [
            ("bad_jpeg", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"a red circle"}),
            ("empty_caption", {"jpg": jpeg.getvalue(), "txt": b""}),
            ("blank_caption", {"jpg": jpeg.getvalue(), "txt": b"  \n "}),
            ("zero_bytes", {"jpg": b"", "txt": b"a blue star"}),
            ("good_after", {"jpg": jpeg.getvalue(), "txt": b"a white cross at the centre"}),
        ],
    )
    batches = list(data_module(tmp_path, batch_size=4).train_dataloader())
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 7 and "good_after" in keys
    assert sum(int(b.n_skipped) for b in batches) == 4


def test_batches_are_padded_to_their_longest_caption(tmp_path):
    write_split(tmp_path, n=12, per_shard=12, seed=0)
    module = data_module(tmp_path, batch_size=4)
    for batch in module.train_dataloader():
        lengths = batch.mask.sum(1)
        assert batch.ids.shape[1] == int(lengths.max())
        assert batch.images.shape == (len(batch), 3, 32, 32)


def test_missing_shards_fail_with_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data-cc3m"):
        shard_list(str(tmp_path / "nothing/{00000..00003}.tar"), "make data-cc3m")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        shard_list(str(tmp_path), "")


def test_fewer_shards_than_ranks_is_refused_instead_of_hanging():
    with pytest.raises(ValueError, match="1 shard\\(s\\) for 2 ranks"):
        check_every_rank_has_shards(["a.tar"], world_size=2, split="val", resampled=False)
    check_every_rank_has_shards(["a.tar"], world_size=2, split="train", resampled=True)
    check_every_rank_has_shards(["a.tar", "b.tar"], world_size=2, split="val", resampled=False)


def test_precomputed_feature_shards_give_the_same_features_and_losses(tmp_path):
    write_split(tmp_path / "images", n=10, per_shard=5, seed=0)
    with tarfile.open(tmp_path / "images" / "00001.tar", "a") as tar:  # one undecodable image
        for name, data in [("broken.jpg", b"not a jpeg"), ("broken.txt", b"a caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    model = tiny_fromage("opt")
    counts = precompute(
        model.vision, "tiny-clip", shard_list(str(tmp_path / "images")), tmp_path / "features"
    )
    assert counts == {"written": 10, "skipped": 1}

    from_images = data_module(tmp_path / "images", batch_size=10)
    from_features = data_module(tmp_path / "features", batch_size=10)
    pixels_batch = next(iter(from_images.train_dataloader()))
    features_batch = next(iter(from_features.train_dataloader()))
    assert features_batch.has_features and not pixels_batch.has_features
    assert features_batch.keys == pixels_batch.keys
    module = FromageLitModule(compose("demo"), model)
    assert torch.allclose(
        module._features(features_batch), model.image_features(pixels_batch.images), atol=1e-6
    )
    with_tower = module._losses(pixels_batch, concat_captions=False)
    without = module._losses(features_batch, concat_captions=False)
    assert torch.allclose(with_tower.total(), without.total(), atol=1e-6)

    other = FromageLitModule(
        compose("demo"), FromageModel(model.lm, model.tokenizer, tiny_timm_tower())
    )
    with pytest.raises(
        ValueError, match="precomputed features are 24-d but the vision tower's are 64-d"
    ):
        other._features(features_batch)
