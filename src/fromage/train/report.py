"""Evaluate a trained run on its held-out shards and write a short report.

``python -m fromage.train.report EXPERIMENT [overrides]`` reads the run's last checkpoint and
writes ``report.json`` and ``report.md`` beside it: recall@k in both directions against
chance, a few generated captions, and a few text-to-image retrievals.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from omegaconf import DictConfig

from fromage.config import compose
from fromage.data.datamodule import CaptionDataModule
from fromage.infer.bank import ImageBank
from fromage.metrics import PairedRecall
from fromage.model.fromage import FromageModel
from fromage.train.module import FromageLitModule
from fromage.train.run import run_dir

N_EXAMPLES = 4


def load_trained(config: DictConfig) -> FromageLitModule:
    checkpoint = run_dir(config) / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: train first")
    return FromageLitModule(config).load_trainable(checkpoint).eval()


@torch.no_grad()
def evaluate(model: FromageModel, data: CaptionDataModule, ks: list[int]) -> dict:
    """Recall@k over the whole held-out split, plus examples of captions and retrievals."""
    recall = PairedRecall(ks)
    keys, captions, pixels = [], [], []
    for batch in data.val_dataloader():
        out = model(model.image_features(batch.images), batch.ids, batch.mask)
        recall.update(out.text_embeddings, out.image_embeddings)
        keys += batch.keys
        captions += model.tokenizer.batch_decode(batch.ids, skip_special_tokens=True)
        pixels += list(batch.images[: N_EXAMPLES - len(pixels)])
    metrics = {k: float(v) for k, v in recall.compute().items()}
    n = int(metrics["n_pairs"])
    metrics.update({f"chance_R@{k}": k / n for k in ks})
    bank = ImageBank(torch.cat(recall.image), keys)
    examples = {"captions": [], "retrievals": []}
    for i, image in enumerate(pixels):
        generated = model.generate([image], bank=bank, max_new_tokens=16, exclude_ids={keys[i]})
        pieces = [p if isinstance(p, str) else [hit.id for hit in p] for p in generated.pieces]
        examples["captions"].append({"key": keys[i], "true": captions[i], "generated": pieces})
    queries = model.retrieval_queries([[captions[i] + "[RET]"] for i in range(N_EXAMPLES)])
    for i, hits in enumerate(bank.search(queries, k=3)):
        examples["retrievals"].append(
            {
                "query": captions[i],
                "true_key": keys[i],
                "retrieved": [(h.id, captions[keys.index(h.id)], round(h.score, 3)) for h in hits],
            }
        )
    return {"metrics": metrics, "examples": examples}


def markdown(result: dict, ks: list[int]) -> str:
    m = result["metrics"]
    lines = [
        f"# Held-out retrieval ({int(m['n_pairs'])} pairs)",
        "",
        "| | " + " | ".join(f"R@{k}" for k in ks) + " |",
        "| --- |" + " --- |" * len(ks),
    ]
    for name, prefix in [
        ("text -> image", "t2i_"),
        ("image -> text", "i2t_"),
        ("chance", "chance_"),
    ]:
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * m[f'{prefix}R@{k}']:.1f}" for k in ks) + " |"
        )
    lines += ["", "## Generated captions", ""]
    for ex in result["examples"]["captions"]:
        shown = " ".join(
            p if isinstance(p, str) else f"[retrieved {', '.join(p)}]" for p in ex["generated"]
        )
        lines.append(f"- `{ex['key']}` true: *{ex['true']}* — generated: *{shown}*")
    lines += ["", "## Text -> image retrieval", ""]
    for ex in result["examples"]["retrievals"]:
        hits = "; ".join(f"`{key}` ({caption}, {score})" for key, caption, score in ex["retrieved"])
        lines.append(f"- *{ex['query']}* (true `{ex['true_key']}`): {hits}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--min-recall-over-chance",
        type=float,
        default=0.0,
        help="exit non-zero unless text->image R@1 is at least this many times chance",
    )
    args = parser.parse_args(argv)
    config = compose(args.experiment, args.overrides)
    model = load_trained(config).model
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    ks = list(config.recall_ks)
    result = evaluate(model, data, ks)
    directory = run_dir(config)
    report = markdown(result, ks)
    (directory / "report.json").write_text(json.dumps(result, indent=2))
    (directory / "report.md").write_text(report)
    print(report)
    ratio = result["metrics"]["t2i_R@1"] / result["metrics"]["chance_R@1"]
    print(
        f"text->image R@1 is {ratio:.1f}x chance (bar: {args.min_recall_over_chance}x); report in {directory}"
    )
    return 0 if ratio >= args.min_recall_over_chance else 1


if __name__ == "__main__":
    sys.exit(main())
