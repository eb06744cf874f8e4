"""The `deepsuite` command: train, prepare-data, generate, convert, plan.

Thin: each subcommand parses its arguments and calls one function of the package. A user error
(bad config, data or checkpoint) prints one line `error: …` on stderr and exits with status 2,
without a traceback; a diverged run exits with status 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3

_EPILOG_OVERRIDES = (
    "Overrides are `section.key=value` pairs applied over the file (CLI > file > defaults), e.g. "
    "training.steps=100 model.n_layers=4 checkpoint.dir=runs/x. See docs/config_reference.md for every key."
)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="run config YAML (default: the built-in defaults)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.steps=100"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="deepsuite",
        description="Train DeepSeek-V3 and GPT models with DeepSpeed: data preparation, training, "
        "generation, checkpoint conversion and size planning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (a world of one, or every rank under torchrun)",
        description="Train as configured, through the DeepSpeed engine. Resumes from the latest checkpoint "
        "in checkpoint.dir when checkpoint.resume=auto (the default) or with --resume.",
        epilog=_EPILOG_OVERRIDES,
    )
    _add_config(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest checkpoint in checkpoint.dir and fail if there is none "
        "(to resume from a given folder: checkpoint.resume=PATH)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and the parallel layout, print them and the DeepSpeed config, do not train",
    )

    p = sub.add_parser(
        "prepare-data",
        help="tokenize a corpus into packed token shards",
        description="Read data.source, split documents into train/val, train (or load) the SentencePiece "
        "tokenizer and write token shards + meta.json into data.out_dir.",
        epilog=_EPILOG_OVERRIDES,
    )
    _add_config(p)
    p.add_argument("--force", action="store_true", help="rebuild even when data.out_dir is up to date")

    p = sub.add_parser(
        "generate",
        help="sample text from a training checkpoint",
        description="Load a checkpoint (a run folder through its `latest` pointer, or a step_N folder) and "
        "continue a prompt.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="run folder or step_N checkpoint folder"
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=50,
        metavar="K",
        help="sample from the K most likely tokens (default 50; 0 = off)",
    )
    p.add_argument(
        "--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold (default off)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")

    p = sub.add_parser(
        "convert",
        help="convert checkpoints between deepsuite, training (ZeRO) and Hugging Face formats",
        description="Checkpoint conversions; every output folder is written atomically.",
    )
    conv = p.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    for name, text in (
        (
            "hf-to-deepsuite",
            "an HF folder (config.json + safetensors) → a deepsuite folder (model.yaml + safetensors)",
        ),
        ("deepsuite-to-hf", "a deepsuite folder or a training checkpoint → an HF folder"),
        (
            "zero-to-hf",
            "a training checkpoint of any ZeRO stage → an HF folder with consolidated fp32 weights",
        ),
    ):
        c = conv.add_parser(name, help=text, description=text)
        c.add_argument("src", metavar="SRC", help="input folder")
        c.add_argument("dst", metavar="DST", help="output folder")
        c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    p = sub.add_parser(
        "plan",
        help="per-GPU memory and all-to-all traffic of a model on a cluster layout",
        description="Count the model's parameters on the meta device and print per-GPU parameter, gradient, "
        "optimizer and activation memory and all-to-all bytes per step for nodes × GPUs × ZeRO stage × "
        "ep_size × micro-batch × sequence length; says what does not fit and which layouts would.",
    )
    from deepsuite.parallel.plan import add_plan_arguments

    add_plan_arguments(p)
    return parser


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from deepsuite.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """`deepsuite train`."""
    cfg = _config(args)
    if args.dry_run:
        from deepsuite.training.trainer import dry_run

        print(dry_run(cfg))
        return 0
    from deepsuite.training.trainer import train

    resume = None
    if args.resume:
        from deepsuite.checkpoint.manager import CheckpointError, find_checkpoint

        path = cfg.checkpoint.resume if cfg.checkpoint.resume not in ("auto", "never") else cfg.checkpoint.dir
        try:
            resume = str(find_checkpoint(path))
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}") from None
    train(cfg, resume=resume)  # the process group is left to the atexit handler of init_distributed
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """`deepsuite prepare-data`."""
    from deepsuite.data.prepare import prepare_data

    prepare_data(_config(args).data, force=args.force)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`deepsuite generate`."""
    from pathlib import Path

    from deepsuite.checkpoint.manager import find_checkpoint, load_model_from_checkpoint
    from deepsuite.data import Tokenizer
    from deepsuite.training.trainer import generate_text

    if args.max_new_tokens < 0:
        from deepsuite.config import ConfigError

        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    path = find_checkpoint(args.checkpoint)
    model, state, _ = load_model_from_checkpoint(path)
    tok_path = path / "tokenizer.model"
    tok = Tokenizer(tok_path if tok_path.is_file() else Path(state["tokenizer"]))
    text = generate_text(
        model,
        tok,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(text)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`deepsuite convert`."""
    from deepsuite.checkpoint import convert

    fn = {
        "hf-to-deepsuite": convert.hf_to_deepsuite,
        "deepsuite-to-hf": convert.deepsuite_to_hf,
        "zero-to-hf": convert.zero_to_hf,
    }[args.conversion]
    try:
        out = fn(args.src, args.dst, overwrite=args.overwrite)
    except FileExistsError as exc:
        from deepsuite.config import ConfigError

        raise ConfigError(f"{exc}") from None
    print(f"wrote {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`deepsuite plan`."""
    from deepsuite.parallel.plan import plan_main

    return plan_main(args)


_COMMANDS = {
    "train": cmd_train,
    "prepare-data": cmd_prepare_data,
    "generate": cmd_generate,
    "convert": cmd_convert,
    "plan": cmd_plan,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepsuite.config.errors import ConfigError
    from deepsuite.data.errors import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError, NotImplementedError]
    for module, name in (
        ("deepsuite.checkpoint.manager", "CheckpointError"),
        ("deepsuite.checkpoint.hf_io", "CheckpointFormatError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `deepsuite` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        diverged = sys.modules.get("deepsuite.training.trainer")
        if diverged is not None and isinstance(exc, diverged.TrainingDivergedError):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_DIVERGED
        raise


if __name__ == "__main__":
    raise SystemExit(main())
