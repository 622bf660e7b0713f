import io
import tarfile
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from data_prep.precompute_features import precompute
from data_prep.synthetic import make_pair, write_split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fromage.config import DataConfig, compose
from fromage.data.datamodule import (
    WARNINGS_SHOWN,
    CaptionDataModule,
    Example,
    NoGoodSamples,
    Skipped,
    caption_pipeline,
    check_every_rank_has_shards,
    collate,
    decode_sample,
    shard_list,
)
from fromage.model.fromage import FromageModel
from fromage.model.tokens import add_ret_token
from fromage.train.module import FromageLitModule
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


def test_fewer_training_shards_than_ranks_is_refused_instead_of_hanging():
    with pytest.raises(ValueError, match="1 shard\\(s\\) for 2 ranks"):
        check_every_rank_has_shards(["a.tar"], world_size=2, resampled=False)
    check_every_rank_has_shards(["a.tar"], world_size=2, resampled=True)
    check_every_rank_has_shards(["a.tar", "b.tar"], world_size=2, resampled=False)


def test_three_ranks_by_two_workers_share_two_unequal_validation_shards_by_samples(tmp_path):
    write_split(tmp_path, n=17, per_shard=10, seed=0)  # shards of 10 and 7 samples
    tokenizer = make_tokenizer()
    collate_fn = partial(collate, tokenizer, add_ret_token(tokenizer), 24)
    preprocess = tiny_clip_tower().preprocess
    shards = shard_list(str(tmp_path))
    per_rank = []
    for rank in range(3):
        pipeline = caption_pipeline(shards, preprocess, collate_fn, 4, sample_split=(rank, 3))
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
        per_rank.append([key for batch in loader for key in batch.keys])
    assert sorted(len(keys) for keys in per_rank) == [5, 5, 7]  # per worker: 4+3, 3+2, 3+2
    seen = Counter(key for keys in per_rank for key in keys)
    assert set(seen) == {f"{s:05d}{i:04d}" for s, n in [(0, 10), (1, 7)] for i in range(n)}
    assert set(seen.values()) == {1}


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
        features_batch.images, model.image_features(pixels_batch.images), atol=1e-6
    )
    with_tower = module.model_step(pixels_batch)
    without = module.model_step(features_batch)
    assert torch.allclose(with_tower.total(), without.total(), atol=1e-6)

    other = FromageLitModule(
        compose("demo"), FromageModel(model.lm, model.tokenizer, tiny_timm_tower())
    )
    with pytest.raises(
        ValueError, match="precomputed features are 24-d but the vision tower's are 64-d"
    ):
        other.model_step(features_batch)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_odd_images_are_converted_and_bad_ones_skipped_and_counted(tmp_path, monkeypatch):
    (shard,) = write_split(tmp_path, n=2, per_shard=2, seed=0)
    base, _, _ = make_pair(__import__("random").Random(2))
    sixteen_bit = Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64))
    add_to_shard(
        shard,
        [
            ("grey", {"png": encoded(base.convert("L"), "PNG"), "txt": b"a grey one"}),
            ("cmyk", {"jpg": encoded(base.convert("CMYK"), "JPEG"), "txt": b"a cmyk one"}),
            ("rgba", {"png": encoded(base.convert("RGBA"), "PNG"), "txt": b"a rgba one"}),
            ("palette", {"png": encoded(base.convert("P"), "PNG"), "txt": b"a palette one"}),
            ("sixteen", {"png": encoded(sixteen_bit, "PNG"), "txt": b"a 16-bit one"}),
            ("latin1", {"jpg": encoded(base, "JPEG"), "txt": "caf\xe9 au lait".encode("latin-1")}),
            ("huge", {"png": encoded(Image.new("RGB", (300, 300)), "PNG"), "txt": b"a bomb"}),
            ("long", {"jpg": encoded(base, "JPEG"), "txt": b" ".join([b"red"] * 200)}),
        ],
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # "huge" is over twice this
    batches = list(data_module(tmp_path, batch_size=16, max_len=24).train_dataloader())
    (batch,) = batches
    assert set(batch.keys) == {
        "000000000",
        "000000001",
        "grey",
        "cmyk",
        "rgba",
        "palette",
        "sixteen",
        "latin1",
        "long",
    }
    assert batch.n_skipped == 1 and batch.images.shape[1:] == (3, 32, 32)
    assert torch.isfinite(batch.images).all()
    long_row = batch.keys.index("long")
    assert batch.mask[long_row].sum() == 24 and batch.ids[long_row, 23] == batch.ids.max()


def test_a_shard_cut_mid_record_keeps_its_whole_samples_and_counts_the_loss(tmp_path):
    first, _ = write_split(tmp_path, n=10, per_shard=5, seed=0)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) * 2 // 3])  # cut inside a record
    batches = list(data_module(tmp_path, batch_size=16).train_dataloader())
    keys = [k for b in batches for k in b.keys]
    assert set(keys) >= {f"00001{i:04d}" for i in range(5)}  # the intact shard, all of it
    assert 5 < len(keys) < 10
    # the half record is skipped, and the read error that cut the shard short is counted
    # too (webdataset reports it at more than one level, so this is not an exact number)
    assert sum(b.n_skipped for b in batches) >= 2


@pytest.mark.parametrize("resampled", [False, True])
def test_shards_of_random_bytes_stop_training_naming_them_with_bounded_warnings(
    tmp_path, caplog, resampled
):
    (tmp_path / "00000.tar").write_bytes(np.random.default_rng(0).bytes(20000))
    module = data_module(tmp_path)
    module.config.resampled = resampled
    with pytest.raises(NoGoodSamples, match=r"no training sample decodes.*00000\.tar"):
        next(iter(module.train_dataloader()))
    assert 1 <= len(caplog.records) <= WARNINGS_SHOWN + 1


def test_a_shard_of_only_undecodable_images_stops_but_a_good_shard_beside_it_trains(tmp_path):
    bad = tmp_path / "00000.tar"
    add_to_shard(
        bad, [(f"k{i}", {"jpg": b"not an image", "txt": b"a red circle"}) for i in range(3)]
    )
    with pytest.raises(NoGoodSamples, match=r"a whole pass.* 3 bad and no good one"):
        list(data_module(tmp_path).train_dataloader())
    (good,) = write_split(tmp_path / "good", n=4, per_shard=4, seed=0)
    good.rename(tmp_path / "00001.tar")  # read after the bad one: its skips are counted
    batches = list(data_module(tmp_path).train_dataloader())
    assert sum(len(b) for b in batches) == 4 and sum(b.n_skipped for b in batches) == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=512), caption=st.text(max_size=80))
def test_random_bytes_and_unicode_never_break_the_pipeline(payload, caption):
    """Property: any image payload and caption either decodes or is skipped; whatever
    decodes collates into rows that end in exactly one [RET]."""
    tokenizer = make_tokenizer()
    ret_id = add_ret_token(tokenizer)
    preprocess = tiny_clip_tower().preprocess
    sample = {"__key__": "k", "jpg": payload, "txt": caption.encode("utf-8", "surrogatepass")}
    outcome = decode_sample(preprocess, sample)
    assert isinstance(outcome, Example | Skipped)
    if isinstance(outcome, Example):
        batch = collate(tokenizer, ret_id, 24, [outcome])
        assert (batch.ids == ret_id).sum() == 1 and batch.ids[0, batch.lengths[0] - 1] == ret_id
