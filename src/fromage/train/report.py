"""Evaluate a trained run on its held-out shards and write a short report.

``python -m fromage.train.report EXPERIMENT [overrides]`` reads the run's last checkpoint and
writes ``report.json`` and ``report.md`` beside it: recall@k in both directions against
chance, a few generated captions, and a few text-to-image retrievals. Where the shards
record each image's attributes (the synthetic set), it also checks exactly every held-out
pair: whether the generated caption names the image's colour, shape and place, and
whether the top image retrieved for its caption has them. ``model.*`` overrides say how to
run the trained model (e.g. ``model.lm.quantize=int8``); that report is written beside the
plain one, as ``report[lm.quantize=int8].md``.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from fromage.config import RUNTIME_MODEL_KEYS, compose, split_model_overrides
from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.eval.attributes import (
    Attributes,
    caption_accuracy,
    retrieval_accuracy,
    shard_attributes,
    vocabulary_of,
)
from fromage.infer.bank import ImageBank
from fromage.infer.bank_build import chunks
from fromage.infer.generation import GenerationConfig, generate, greedy_captions
from fromage.infer.scoring import retrieval_queries
from fromage.metrics import PairedRecall
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.tokens import RET_TOKEN
from fromage.paths import RunPaths
from fromage.reporting import markdown_table, write_json
from fromage.train.callbacks import contextual_recall_callback
from fromage.train.module import FromageLitModule

N_EXAMPLES = 4  # captions and retrievals shown as examples: enough to read at a glance
EXAMPLE_CAPTION_TOKENS = 16  # the demo's captions are at most 9 tokens: room to see what follows
EXAMPLE_HITS = 3  # images listed per example retrieval
# images (or captions) per batched call of the exact checks: bounds the memory of one
# greedy-captioning batch and of its LM pass
CHECK_BATCH = 100
# libraries whose versions can move the numbers (kernels, image decoding, weight init,
# shuffling, GGUF dequantization): recorded so two reports can be told apart
RECORDED_PACKAGES = ("torch", "transformers", "timm", "webdataset", "pillow", "numpy", "lightning")


@torch.no_grad()
def evaluate(
    module: FromageLitModule,
    data: CaptionDataModule,
    ks: list[int],
    truths: dict[str, Attributes] | None = None,
) -> dict:
    """Recall@k (percent) over the whole held-out split, through the training module's own
    step (pixels or precomputed features), plus examples of captions and retrievals
    (captions only where the shards hold pixels). With ``truths`` (key -> attributes),
    also the caption and retrieval accuracies of ``attribute_accuracies``."""
    model = module.model
    recall = PairedRecall(ks)
    keys, captions, pixels = [], [], []
    for batch in data.val_dataloader():
        out = module.model_step(batch)
        recall.update(out.text_embeddings, out.image_embeddings)
        keys += batch.keys
        captions += model.tokenizer.batch_decode(batch.ids, skip_special_tokens=True)
        if not batch.has_features:  # every image when they are all checked, else examples
            pixels += list(batch.images[: len(batch) if truths else N_EXAMPLES - len(pixels)])
    metrics = recall.compute()
    n = int(metrics["n_pairs"])
    metrics.update({f"chance_R@{k}": 100 * k / n for k in ks})
    bank = ImageBank(torch.cat(recall.image), keys)
    if truths and pixels:
        metrics.update(attribute_accuracies(model, bank, keys, captions, pixels, truths))
    examples = {"captions": [], "retrievals": []}
    for i, image in enumerate(pixels[:N_EXAMPLES]):
        prompt = [image, model.input_prompt]  # as training laid captions out
        generated = generate(
            model,
            prompt,
            bank,
            GenerationConfig(max_new_tokens=EXAMPLE_CAPTION_TOKENS),
            exclude_ids={keys[i]},
        )
        pieces = [p if isinstance(p, str) else [hit.id for hit in p] for p in generated.pieces]
        examples["captions"].append({"key": keys[i], "true": captions[i], "generated": pieces})
    queries = retrieval_queries(model, [[c + RET_TOKEN] for c in captions[:N_EXAMPLES]])
    for i, hits in enumerate(bank.search(queries, k=EXAMPLE_HITS)):
        examples["retrievals"].append(
            {
                "query": captions[i],
                "true_key": keys[i],
                "retrieved": [(h.id, captions[keys.index(h.id)], round(h.score, 3)) for h in hits],
            }
        )
    return {"metrics": metrics, "examples": examples}


def attribute_accuracies(
    model: FromageModel,
    bank: ImageBank,
    keys: list[str],
    captions: list[str],
    pixels: list[torch.Tensor],
    truths: dict[str, Attributes],
) -> dict[str, float]:
    """Percent of held-out images whose greedy caption (text only, as many tokens as the
    longest true caption) names their attributes exactly, and percent of held-out captions whose
    top-1 retrieved image (``caption[RET]``, the whole split as the bank) has the
    caption's attributes."""
    truth_of = [truths[k] for k in keys]
    longest = max(len(ids) for ids in model.tokenizer(captions, add_special_tokens=False).input_ids)
    generated = [
        c for part in chunks(pixels, CHECK_BATCH) for c in greedy_captions(model, part, longest)
    ]
    top = []
    for part in chunks([[c + RET_TOKEN] for c in captions], CHECK_BATCH):
        top += [hits[0].id for hits in bank.search(retrieval_queries(model, part), k=1)]
    return {
        "caption_accuracy": caption_accuracy(generated, truth_of, vocabulary_of(truth_of)),
        "retrieval_accuracy": retrieval_accuracy(keys, top, truths),
        "n_checked": len(keys),
    }


def markdown(result: dict, ks: list[int]) -> str:
    m = result["metrics"]
    rows = {
        name: {f"R@{k} (%)": m[f"{prefix}R@{k}"] for k in ks}
        for name, prefix in [
            ("text -> image", "t2i_"),
            ("image -> text", "i2t_"),
            ("chance", "chance_"),
        ]
    }
    lines = [f"# Held-out retrieval ({int(m['n_pairs'])} pairs)", "", markdown_table(rows, 1)]
    if "n_checked" in m:
        lines += [
            "",
            f"## Exact checks ({m['n_checked']} held-out pairs)",
            "",
            f"- generated caption names the image's colour, shape and place: "
            f"{m['caption_accuracy']:.1f}%",
            f"- top-1 image retrieved for a caption has its colour, shape and place: "
            f"{m['retrieval_accuracy']:.1f}%",
        ]
    if "contextual" in result:
        rows = {f"FROMAGe, {setting}": recall for setting, recall in result["contextual"].items()}
        lines += [
            "",
            "## Contextual retrieval (VIST's three settings; recall in %)",
            "",
            result["contextual_stories"],
            "",
            markdown_table(rows, 1),
        ]
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
    if "provenance" in result:
        lines += ["", "## What these numbers depend on", ""]
        lines += [f"- {name}: {value}" for name, value in result["provenance"].items()]
    return "\n".join(lines) + "\n"


def provenance(model: FromageModel, tower_checkpoint: str | None) -> dict[str, str | int]:
    """What the report's numbers depend on beyond the config: the trained weights and the
    tower file (digests), library versions, the CPU and torch's thread count. Equal
    digests with different numbers point at the machine or libraries, not the training."""
    record: dict[str, str | int] = {"trained weights": tensors_digest(model.trainable_state_dict())}
    if tower_checkpoint and Path(tower_checkpoint).is_file():
        record["tower checkpoint"] = hashlib.sha256(
            Path(tower_checkpoint).read_bytes()
        ).hexdigest()[:16]
    for name in RECORDED_PACKAGES:
        try:
            record[name] = version(name)
        except PackageNotFoundError:
            record[name] = "not installed"
    record |= {"python": platform.python_version(), "cpu": cpu_name()}
    record["torch threads"] = torch.get_num_threads()
    return record


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of the names, dtypes, shapes and exact bytes of ``state``."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
    for name in ("caption", "retrieval"):
        parser.add_argument(
            f"--min-{name}-accuracy",
            type=float,
            default=0.0,
            help=f"exit non-zero unless the {name} accuracy (a fraction) is at least this",
        )
    args = parser.parse_args(argv)
    config = compose(args.experiment, args.overrides)
    paths = RunPaths.of(config)
    if not paths.last_checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint at {paths.last_checkpoint}: train first")
    # model.* overrides that say how to run it (e.g. model.lm.quantize=int8) apply on load
    runtime, _ = split_model_overrides(args.overrides)
    module = FromageLitModule(config, load_model(paths.last_checkpoint, runtime))
    model = module.model
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    ks = list(config.recall_ks)
    truths = shard_attributes(shard_list(config.data.val_shards, config.data.how_to_make))
    result = evaluate(module, data, ks, truths)
    if contexts := contextual_recall_callback(config.data, ks, config.seed):
        result["contextual"] = contexts.contextual_recall(model)
        source = config.data.stories or "runs of 5 consecutive validation pairs"
        result["contextual_stories"] = f"{len(contexts.stories)} stories: {source}"
    result["provenance"] = provenance(model, config.model.vision.checkpoint)
    report = markdown(result, ks)
    out = paths.report([o for o in runtime if o.split("=")[0] in RUNTIME_MODEL_KEYS])
    write_json(out.with_suffix(".json"), result)
    out.write_text(report)
    print(report)
    return 0 if passes(result["metrics"], args) else 1


def passes(metrics: dict, args: argparse.Namespace) -> bool:
    """Print each bar against its measure; whether all are met (an accuracy the shards
    cannot check fails a bar above 0)."""
    ratio = metrics["t2i_R@1"] / metrics["chance_R@1"]
    print(f"text->image R@1 is {ratio:.1f}x chance (bar: {args.min_recall_over_chance}x)")
    ok = ratio >= args.min_recall_over_chance
    for name, bar in [
        ("caption", args.min_caption_accuracy),
        ("retrieval", args.min_retrieval_accuracy),
    ]:
        accuracy = metrics.get(f"{name}_accuracy", 0.0) / 100
        print(f"{name} accuracy is {accuracy:.3f} (bar: {bar})")
        ok &= accuracy >= bar
    return ok


if __name__ == "__main__":
    sys.exit(main())
