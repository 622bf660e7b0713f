"""Fine-tune a trained model on your own pairs, measured on their held-out split before and after.

    python -m fromage.train.finetune INIT --data data/finetune/NAME --name NAME [overrides]

INIT is anything ``fromage.load_model`` reads (the paper's release, a saved model, a
run). ``--data`` is what ``data_prep/pairs.py`` wrote. The run keeps INIT's model
config, starts from its weights with a fresh optimizer (``init_from``), and writes
``runs/NAME/finetune.{md,json}`` (paired recall@k before and after) and
``runs/NAME/bank`` (every new image, embedded by the fine-tuned model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fromage.config import compose, split_model_overrides
from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.data.image_sources import shard_images
from fromage.infer.bank_build import build_bank
from fromage.model.load import load_model, trained_weights
from fromage.paths import RunPaths
from fromage.reporting import markdown_table, write_json
from fromage.train.module import FromageLitModule
from fromage.train.report import evaluate
from fromage.train.run import train


def finetune_config(init: str, data: Path, name: str, overrides: list[str] = ()) -> DictConfig:
    """``conf/experiment/finetune.yaml`` on the pairs' shards, with INIT's model config;
    ``model.*`` overrides apply on top of it."""
    model_overrides, others = split_model_overrides(overrides)
    config = compose(
        "finetune",
        [
            f"data.train_shards={data / 'train'}",
            f"data.val_shards={data / 'val'}",
            f"name={name}",
            f"init_from={init}",
            *others,
        ],
    )
    source, _ = trained_weights(init)
    merged = OmegaConf.merge(
        config,
        {"model": OmegaConf.structured(source)},
        {"model": OmegaConf.from_dotlist(model_overrides)},
    )
    OmegaConf.set_readonly(merged, True)
    return merged


def held_out_recall(module: FromageLitModule, config: DictConfig) -> dict[str, float]:
    """Paired recall@k (percent) on the held-out pairs, through the training step."""
    model = module.model
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    metrics = evaluate(module, data, list(config.recall_ks))["metrics"]
    return {k: v for k, v in metrics.items() if k.startswith(("t2i_", "i2t_"))}


def finetune(init: str, data: Path, name: str, overrides: list[str] = ()) -> dict:
    config = finetune_config(init, data, name, overrides)
    model = load_model(init)
    before = held_out_recall(FromageLitModule(config, model), config)
    _, module = train(config, model.train())
    after = held_out_recall(module.eval(), config)
    paths = RunPaths.of(config)
    table = markdown_table({"before": before, "after": after}, digits=1)
    results = {"init": str(init), "data": str(data), "before": before, "after": after}
    write_json(paths.root / "finetune.json", results)
    (paths.root / "finetune.md").write_text(
        f"# Fine-tuning {init} on {data}\n\nRecall@k (%) on the held-out pairs:\n\n{table}\n"
    )
    shards = shard_list(str(data / "train")) + shard_list(str(data / "val"))
    summary = build_bank(module.model, shard_images(shards), paths.root / "bank", progress=False)
    results["bank"] = {"path": str(paths.root / "bank"), "images": summary.added}
    print(table)
    print(f"bank of {summary.added} new images in {paths.root / 'bank'}; table in {paths.root}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("init", help="the model to start from (release, saved model or run)")
    parser.add_argument("--data", type=Path, required=True, help="output of data_prep/pairs.py")
    parser.add_argument("--name", default="finetune", help="the run's name under runs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. trainer.max_steps=50")
    args = parser.parse_args(argv)
    return finetune(args.init, args.data, args.name, args.overrides)


if __name__ == "__main__":
    main()
