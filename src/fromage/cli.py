"""The ``fromage`` command: chat with a trained model, retrieve images, build image banks.

    fromage bank runs/demo/pretrained --shards data/synthetic/val --out runs/demo/bank
    fromage index runs/demo/bank --index ivfpq
    fromage retrieve runs/demo/pretrained --bank runs/demo/bank "a red star at the top left"
    fromage chat runs/demo/pretrained --bank runs/demo/bank
    fromage convert fromage_model/ models/fromage-opt-6.7b     # the paper's release, a run, a .ckpt
    fromage doctor Qwen/Qwen3-0.6B --dtype bfloat16          # can this LM be grounded here?
    fromage plan paper --gpus 8 --gpu-memory 40GB            # memory per GPU, which trainer fits

MODEL is anything ``fromage.load_model`` reads: a saved model directory (training writes
one to ``runs/NAME/pretrained``), a run directory, a training ``.ckpt`` or the paper's release.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch

import fromage.doctor as doctor_checks
import fromage.train.plan as memory_plan
from fromage.config import (
    ModelConfig,
    VisionConfig,
    add_override_argument,
    compose,
    positive_int,
)
from fromage.data.datamodule import shard_list
from fromage.data.image_sources import (
    ImageLoadError,
    folder_images,
    listed_images,
    open_image,
    shard_images,
)
from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.infer.bank_build import build_bank, check_bank_fits
from fromage.infer.bank_index import (
    build_index,
    check_index_kind,
    index_is_current,
    requested_index_kind,
)
from fromage.infer.dialogue import LAYOUTS, Dialogue, caption_question_images, default_layout
from fromage.infer.generation import GenerationConfig, generate
from fromage.infer.scoring import retrieval_queries
from fromage.infer.thumbnails import DEFAULT_THUMBNAIL_SIZE
from fromage.model.backbones import DTYPES
from fromage.model.fromage import FromageModel, Item
from fromage.model.load import load_model
from fromage.model.pretrained import save_pretrained
from fromage.model.tokens import RET_TOKEN
from fromage.web.app import DemoApp, is_loopback, launch

AUTH_ENV = "FROMAGE_AUTH"  # USER:PASSWORD for `fromage serve`, kept out of the shell history
NO_IMAGE = "[no image found]"  # a [RET] whose best image scored under --min-score
IMAGE_TAG = re.compile(r"<img\s+([^>]+?)\s*>")
CHAT_HELP = """Type a message and press enter. Put images in a message as <img PATH_OR_URL>,
e.g.  what is this? <img photos/cat.jpg>   Commands: /reset (forget the conversation), /quit."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fromage",
        description="FROMAGe: a frozen language model that reads images and answers with text "
        "and retrieved images.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    chat = commands.add_parser(
        "chat",
        help="talk with the model in the terminal; images by path",
        description="Interactive multimodal chat. " + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(chat, bank_required=False)
    add_dataclass_arguments(chat, GenerationConfig, skip={"use_cache"})
    chat.add_argument("--seed", type=int, default=0, help="for sampling")
    chat.add_argument("--layout", choices=LAYOUTS, help="the chat's layout (default: the model's)")
    chat.set_defaults(run=_chat)

    serve = commands.add_parser(
        "serve",
        help="the web demo: chat with images, retrieval and captioning in a browser",
        description="Serve the model in a Gradio page on HOST:PORT (localhost by default). The "
        "generation options set the page's initial settings.",
    )
    _model_arguments(serve, bank_required=False)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve your network")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help=f"ask visitors to log in; or set {AUTH_ENV}=USER:PASSWORD, or use --auth-file",
    )
    serve.add_argument(
        "--auth-file", type=Path, help="a file whose first line is USER:PASSWORD (keep it private)"
    )
    serve.add_argument(
        "--concurrency",
        type=positive_int,
        default=2,
        help="replies generated at once; the rest queue (docs/web-demo.md says why 2)",
    )
    serve.add_argument("--max-queue", type=int, default=32, help="visitors that may wait")
    serve.add_argument("--layout", choices=LAYOUTS, help="the chat's layout (default: the model's)")
    serve.add_argument(
        "--cache-seconds",
        type=int,
        default=3600,
        help="uploads and shown files are deleted this long after they were made",
    )
    serve.add_argument(
        "--thumbnails",
        type=Path,
        help="folder for retrieved images' thumbnails (default: a temp dir)",
    )
    add_dataclass_arguments(
        serve, GenerationConfig, skip={"use_cache", "stop_at_newline", "stop_at_ret"}
    )
    serve.set_defaults(run=_serve)

    retrieve = commands.add_parser(
        "retrieve",
        help="the top-k bank images for a text query",
        description="One-shot text-to-image retrieval: the query gets [RET] appended and its "
        "embedding is matched against the bank.",
    )
    _model_arguments(retrieve, bank_required=True)
    retrieve.add_argument("query", help="a description of the image to find")
    retrieve.add_argument("-k", type=positive_int, default=5, help="how many images to list")
    retrieve.set_defaults(run=_retrieve)

    bank = commands.add_parser(
        "bank",
        help="embed images into an image bank (creates it or adds the new images)",
        description="Embed images with the model's image_to_shared layer into an on-disk bank. "
        "Images already in the bank are skipped, so a build can be re-run to resume or grow it.",
    )
    bank.add_argument("model", type=Path, help="a saved model, run, .ckpt or release")
    bank.add_argument("--out", type=Path, required=True, help="bank directory")
    source = bank.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="every image under this folder")
    source.add_argument("--list", type=Path, help="a text file with one path or url per line")
    source.add_argument("--shards", help="WebDataset shards: a directory or brace pattern")
    bank.add_argument("--batch-size", type=positive_int, default=64)
    bank.add_argument(
        "--thumbnail-size",
        type=int,
        default=DEFAULT_THUMBNAIL_SIZE,
        help="longest side of the stored thumbnails in pixels; 0 stores none",
    )
    _index_argument(bank)
    add_override_argument(bank)
    bank.set_defaults(run=_bank)

    index = commands.add_parser(
        "index",
        help="build a bank's search index again, without embedding anything",
        description="Train and store the search index of an existing image bank (appending "
        "to a bank drops its index; `fromage bank` builds it again after each build).",
    )
    index.add_argument("bank", type=Path, help="bank directory")
    _index_argument(index)
    index.set_defaults(run=_index)

    convert = commands.add_parser(
        "convert",
        help="write any trained model (the paper's release, a run, a .ckpt, a DeepSpeed "
        "checkpoint directory) as a saved model directory",
        description="Read the paper's release (pretrained_ckpt.pth.tar + model_args.json), a "
        "run directory or a training checkpoint (a .ckpt file or DeepSpeed's directory; "
        "pickles are read with weights_only=True) and write model.safetensors + fromage.json.",
    )
    convert.add_argument("source", type=Path, help="what to convert")
    convert.add_argument("out", type=Path, help="the new model directory")
    add_override_argument(convert)
    convert.set_defaults(run=_convert)

    doctor = commands.add_parser(
        "doctor",
        help="check that a language model (and tower) can be grounded as FROMAGe here",
        description=doctor_checks.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("lm", help="a hub id, a local folder, wheel:DIST or a .gguf file")
    doctor.add_argument(
        "--vision", help="the image tower (default: a small random timm ViT; the LM is examined)"
    )
    doctor.add_argument(
        "--backend", choices=["hf", "timm"], default="hf", help="the tower's library"
    )
    doctor.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    doctor.add_argument("--steps", type=positive_int, default=3, help="training steps to run")
    doctor.set_defaults(run=_doctor)

    plan = commands.add_parser(
        "plan",
        help="the memory each GPU needs for an experiment, and which strategy fits",
        description=memory_plan.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: fromage plan paper model.lm.name=/models/lm --gpus 8 --gpu-memory 40GB",
    )
    plan.add_argument("experiment", help="an experiment of conf/experiment, e.g. paper")
    plan.add_argument("--gpus", type=positive_int, default=1, help="GPUs in the job")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 40GB")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    plan.set_defaults(run=_plan)
    return parser


def _model_arguments(parser: argparse.ArgumentParser, bank_required: bool) -> None:
    parser.add_argument("model", type=Path, help="a saved model, run, .ckpt or release")
    parser.add_argument(
        "--bank",
        type=Path,
        required=bank_required,
        help="image bank directory (from `fromage bank`)"
        + ("" if bank_required else "; without one the model answers in text only"),
    )
    add_override_argument(parser)


def _index_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        help="how the bank is searched: auto (exact below 30,000 images, ivfpq from there), "
        "exact, ivfpq, or a FAISS index_factory string such as HNSW32 (default: the bank's "
        "last setting, else auto)",
    )


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, config_class, skip: Collection[str] = ()
) -> None:
    """One ``--option`` per dataclass field (``help`` from the field's metadata), so the
    command line never re-declares a config's settings one by one."""
    for f in fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), help=help_text)


def dataclass_from_arguments(args: argparse.Namespace, config_class):
    """The dataclass with every option given on the command line applied."""
    given = {f.name: getattr(args, f.name, None) for f in fields(config_class)}
    return config_class(**{name: value for name, value in given.items() if value is not None})


def _load(args) -> tuple[FromageModel, ImageBank | None]:
    model = load_model(args.model, args.override)
    if args.bank is None:
        return model, None
    bank = ImageBank.open(args.bank)
    check_bank_fits(bank, model)
    return model, bank


def _retrieve(args) -> int:
    model, bank = _load(args)
    query = retrieval_queries(model, [[args.query.rstrip() + RET_TOKEN]])
    for rank, hit in enumerate(bank.search(query, k=args.k)[0], 1):
        print(f"{rank}. {describe(hit)}")
    print(f"({bank.search_kind} search over {len(bank)} images)", file=sys.stderr)
    return 0


def _serve(args) -> int:
    auth = serve_auth(args.auth, args.auth_file, os.environ.get(AUTH_ENV))
    if auth is None and not is_loopback(args.host):
        print(
            f"WARNING: serving on {args.host} without a login: anyone who can reach this "
            f"machine can use the model. Pass --auth USER:PASSWORD, --auth-file or {AUTH_ENV}.",
            file=sys.stderr,
            flush=True,
        )
    defaults = dataclass_from_arguments(args, GenerationConfig)  # refused before loading
    model, bank = _load(args)
    thumbnails = args.thumbnails or Path(tempfile.mkdtemp(prefix="fromage-thumbnails-"))
    app = DemoApp(model, bank, thumbnails, defaults, layout=args.layout)
    print(
        f"serving {args.model} on http://{args.host}:{args.port} ({app.layout} layout)", flush=True
    )
    launch(
        app,
        args.host,
        args.port,
        auth=auth,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        cache_seconds=args.cache_seconds,
    )
    return 0


def serve_auth(flag: str | None, file: Path | None, env: str | None) -> tuple[str, str] | None:
    """The login ``(user, password)`` from ``--auth``, else ``--auth-file``, else the
    environment; None when none is given. A value without ``:`` is refused."""
    given = flag or (file.read_text().splitlines()[0].strip() if file else None) or env
    if not given:
        return None
    user, colon, password = given.partition(":")
    if not (user and colon and password):
        raise SystemExit("a login is USER:PASSWORD, both non-empty")
    return user, password


def _bank(args) -> int:
    model = load_model(args.model, args.override)
    kind = requested_index_kind(args.out, args.index)
    check_index_kind(kind, model.image_to_shared.weight.shape[0])  # before hours of embedding
    if args.folder:
        records = folder_images(args.folder)
    elif args.list:
        records = listed_images([s for s in args.list.read_text().splitlines() if s.strip()])
    else:
        records = shard_images(shard_list(args.shards, "give a directory of .tar shards"))
    summary = build_bank(
        model,
        records,
        args.out,
        batch_size=args.batch_size,
        thumbnail_size=args.thumbnail_size or None,
    )
    for image_id, why in summary.failed:
        print(f"skipped {image_id}: {why}", file=sys.stderr)
    print(
        f"{args.out}: added {summary.added}, already there {summary.already_in_bank}, "
        f"unreadable {len(summary.failed)}; {len(ImageBank.open(args.out))} images in all"
    )
    if not index_is_current(args.out, kind):
        _report_index(args.out, build_index(args.out, kind))
    return 0


def _index(args) -> int:
    _report_index(args.bank, build_index(args.bank, requested_index_kind(args.bank, args.index)))
    return 0


def _report_index(bank: Path, entry: dict) -> None:
    print(f"{bank}: {entry.get('factory', 'exact')} search index over {entry['rows']} images")


def _convert(args) -> int:
    path = save_pretrained(load_model(args.source, args.override), args.out)
    print(f"wrote {path}")
    return 0


def _doctor(args) -> int:
    vision = doctor_checks.DEFAULT_TOWER
    if args.vision:
        vision = VisionConfig(name=args.vision, backend=args.backend)
    lm = doctor_checks.language_model_config(args.lm)
    checks = doctor_checks.diagnose(ModelConfig(lm=lm, vision=vision, dtype=args.dtype), args.steps)
    print(doctor_checks.table(checks))
    return 0 if all(check.passed for check in checks) else 1


def _plan(args) -> int:
    memory = memory_plan.parse_bytes(args.gpu_memory)
    plans = memory_plan.plan(compose(args.experiment, args.overrides), args.gpus, memory)
    print(memory_plan.describe(plans, args.gpus, memory))
    return 0 if any(p.micro_batch for p in plans) else 1


def _chat(args) -> int:
    config = dataclass_from_arguments(args, GenerationConfig)  # refused before loading
    model, bank = _load(args)
    generator = torch.Generator().manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    layout = args.layout or default_layout(model)
    dialogue = Dialogue(layout, model.input_prompt)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            dialogue = Dialogue(layout, model.input_prompt)
            continue
        try:
            turn, sources = parse_message(line.strip())
        except ImageLoadError as error:
            print(f"(could not open an image: {error})")
            continue
        if not turn:
            continue  # an empty line: ask again
        before = replace(dialogue, turns=[list(t) for t in dialogue.turns], seen=set(dialogue.seen))
        try:
            dialogue.ask(turn, bank.ids_of_sources(sources) if bank is not None else ())
            for caption in caption_question_images(model, dialogue):
                print(f"(read the image as: {caption.strip()})")
            if note := dialogue.fit(model, reserve=config.max_new_tokens):
                print(f"({note})")
            reply = generate(
                model,
                dialogue.prompt(),
                bank,
                config,
                exclude_ids=dialogue.seen,
                generator=generator,
            )
        except Exception as error:  # one bad message must not end the conversation
            print(f"(could not answer that message: {type(error).__name__}: {error}; try another)")
            dialogue = before
            continue
        print("fromage> " + render_text(reply.pieces))
        dialogue.answer(reply)


def parse_message(message: str) -> tuple[list[Item], list[str]]:
    """Split ``text <img PATH> text`` into strings and opened images; also return the
    images' sources (local paths resolved, as bank builds store them)."""
    items: list[Item] = []
    sources = []
    for i, part in enumerate(IMAGE_TAG.split(message)):
        if i % 2:
            items.append(open_image(part))
            is_url = part.startswith(("http://", "https://"))
            sources.append(part if is_url else str(Path(part).resolve()))
        elif part.strip():
            items.append(part.strip())
    return items, sources


def describe(hit: RetrievedImage) -> str:
    where = f" {hit.source}" if hit.source and hit.source != hit.id else ""
    return f"[image {hit.id}{where} score={hit.score:.3f}]"


def render_text(pieces: Sequence[str | list[RetrievedImage]]) -> str:
    """Generated pieces as one line: text as is, retrieved images as [image ...] tags, and
    a [RET] that found nothing above the minimum score as [no image found]."""
    return " ".join(
        piece.strip()
        if isinstance(piece, str)
        else " ".join(describe(hit) for hit in piece) or NO_IMAGE
        for piece in pieces
    ).strip()


if __name__ == "__main__":
    sys.exit(main())
