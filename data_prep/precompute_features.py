"""Run the frozen vision tower once over caption shards and write feature shards.

Training from them (``data.train_shards=OUT``) skips the tower on every step; the loss is
the same because the tower is frozen and in eval mode (no augmentation is applied).
Each output shard mirrors an input shard: ``KEY.feat.npy`` (float32 pooled features,
read back without pickle) + ``KEY.txt`` + ``KEY.json`` (with the tower's name).
Undecodable images are skipped and counted, as in training.

    python -m data_prep.precompute_features demo --shards data/synthetic/train --out data/synthetic/train-features

Trailing ``key=value`` arguments override the experiment as in training (e.g.
``model.vision.name=DIR``); ``--device cuda`` runs the tower on the GPU. A random tower
(``pretrained=false``) must run on the device type it will be trained on: it is rebuilt
from its seed there.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from fromage.config import compose
from fromage.data.datamodule import FEATURES, Example, decode_sample, shard_list
from fromage.infer.bank_build import chunks
from fromage.model.backbones import load_vision_tower


@torch.no_grad()
def precompute(
    tower, tower_name: str, shards: list[str], out: Path, batch_size: int = 64
) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0}
    dtype = next(tower.parameters()).dtype
    for shard in shards:
        samples = wds.DataPipeline(
            wds.SimpleShardList([shard]),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.map(lambda sample: decode_sample(tower.preprocess, sample)),
        )
        with wds.TarWriter(str(out / Path(shard).name)) as sink:
            for batch in chunks(samples, batch_size):
                good = [e for e in batch if isinstance(e, Example)]
                counts["skipped"] += len(batch) - len(good)
                if not good:
                    continue
                pixels = torch.stack([e.image for e in good])  # (B, 3, H, W)
                device = next(tower.parameters()).device
                features = tower(pixels.to(device, dtype)).float().cpu()  # (B, d_vis)
                for example, vector in zip(good, features.numpy(), strict=True):
                    buffer = io.BytesIO()
                    np.save(buffer, vector, allow_pickle=False)
                    sink.write(
                        {
                            "__key__": example.key,
                            FEATURES: buffer.getvalue(),
                            "txt": example.caption,
                            "json": json.dumps({"features_of": tower_name}),
                        }
                    )
                counts["written"] += len(good)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment whose model.vision tower to run")
    parser.add_argument("--shards", required=True, help="image shards: directory or pattern")
    parser.add_argument("--out", type=Path, required=True, help="directory for feature shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="where the tower runs (default: CPU)")
    parser.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")
    args = parser.parse_args(argv)
    model = compose(args.experiment, args.overrides).model
    tower = load_vision_tower(model.vision, model.dtype, args.device)
    print(precompute(tower, model.vision.name, shard_list(args.shards), args.out, args.batch_size))


if __name__ == "__main__":
    main()
