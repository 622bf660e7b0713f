"""VisDial v1.0 (val) for evaluation: dialogs with their text resolved, and their images.

Reads the official ``visdial_1.0_val.json`` (``data.dialogs`` with ``image_id``,
``caption`` and 10 rounds of ``question``/``answer``/``answer_options``/``gt_index``
indices into ``data.questions``/``data.answers``), the dense annotations
``visdial_1.0_val_dense_annotations.json`` (one ``round_id``, 1-based, with 100
``gt_relevance`` values per dialog) and the folder ``VisualDialog_val2018/``. Writes
``dialogs.jsonl`` to ``--out``: one dialog per line with the strings filled in, the
image's path (``null`` when missing: the evaluation skips and counts it) and the
dense round (0-based) with its relevances.

    python -m data_prep.visdial --dialogs visdial_1.0_val.json \\
        --dense visdial_1.0_val_dense_annotations.json --images VisualDialog_val2018 --out data/visdial/val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def resolve_dialogs(
    official: dict, dense: list[dict], images: Path, split: str = "val"
) -> list[dict]:
    data = official["data"]
    questions, answers = data["questions"], data["answers"]
    dense_by_image = {d["image_id"]: d for d in dense}
    dialogs = []
    for dialog in data["dialogs"]:
        for number, r in enumerate(dialog["dialog"], 1):
            missing = [
                k for k in ("question", "answer", "answer_options", "gt_index") if k not in r
            ]
            if missing:
                raise ValueError(
                    f"dialog of image {dialog['image_id']}, round {number}: no {missing} "
                    "(visdial_1.0_val.json, the split with answers, is needed, not the test split)"
                )
        image = images / f"VisualDialog_{split}2018_{dialog['image_id']:012d}.jpg"
        annotation = dense_by_image.get(dialog["image_id"])
        dialogs.append(
            {
                "image_id": str(dialog["image_id"]),
                "image": str(image.resolve()) if image.is_file() else None,
                "caption": dialog["caption"],
                "rounds": [
                    {
                        "question": questions[r["question"]],
                        "answer": answers[r["answer"]],
                        "options": [answers[i] for i in r["answer_options"]],
                        "gt_index": r["gt_index"],
                    }
                    for r in dialog["dialog"]
                ],
                "dense": None
                if annotation is None
                else {"round": annotation["round_id"] - 1, "relevance": annotation["gt_relevance"]},
            }
        )
    return dialogs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogs", type=Path, required=True, help="visdial_1.0_val.json")
    parser.add_argument("--dense", type=Path, required=True, help="the dense annotations json")
    parser.add_argument("--images", type=Path, required=True, help="VisualDialog_val2018/")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    dialogs = resolve_dialogs(
        json.loads(args.dialogs.read_text()), json.loads(args.dense.read_text()), args.images
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "dialogs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in dialogs)
    missing = sum(d["image"] is None for d in dialogs)
    print(f"{len(dialogs)} dialogs ({missing} without their image) in {args.out / 'dialogs.jsonl'}")


if __name__ == "__main__":
    main()
