"""The `deepsuite` command: train, prepare-data, generate, convert, consolidate, inspect, plan.

Thin: each subcommand parses its arguments and calls one function of the package. The operator tools
`tools/convert_hf.py`, `tools/consolidate_zero.py` and `tools/inspect_checkpoint.py` are the
`convert`, `consolidate` and `inspect` subcommands as stand-alone scripts (`tool_main`). A user error
(bad config, data or checkpoint) prints one line `error: …` on stderr and exits with status 2,
without a traceback; a diverged run exits with status 3.

Only torch-free modules are imported here; each subcommand imports its torch side when it runs, so
`deepsuite --help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from deepsuite.config import ConfigError, load_config
from deepsuite.config.loader import check_optional_packages, check_schedule
from deepsuite.data.errors import DataError
from deepsuite.parallel.plan import add_plan_arguments, plan_main

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


_DESCRIPTIONS = {
    "convert": "Checkpoint conversions; every output folder is written atomically.",
    "consolidate": "Consolidate a training checkpoint of any ZeRO stage (expert-parallel shards included) "
    "into full fp32 weights in one safetensors folder: an HF folder (config.json) or a deepsuite folder "
    "(model.yaml). Every file is checked against its checksum and with the weights-only unpickler first; "
    "the output is written atomically.",
    "inspect": "Describe a training checkpoint (run folder or step_N), a deepsuite model folder or an HF "
    "folder: model family, flavor and config, step and tokens seen, parameters per dtype, files and "
    "shard layout (ZeRO stage, world size, EP size, files per rank); check that every file is present, "
    "matches its checksum and is readable. Exits 2 with one line naming the file when the checkpoint is "
    "missing or corrupt.",
}


def _add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not check the files against the checksums in their manifest.json before reading them",
    )


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
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
        c.add_argument(
            "--dtype",
            choices=["float32", "bfloat16", "float16"],
            default="float32",
            help="dtype of the written weights (default float32; bfloat16 halves the size)",
        )
        _add_no_verify(c)


def _add_consolidate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="run folder (its `latest` checkpoint) or step_N folder")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument(
        "--step",
        "--tag",
        dest="step",
        metavar="STEP",
        help="the checkpoint of the run folder to take, as N or step_N (default: the one `latest` names)",
    )
    p.add_argument(
        "--format",
        choices=("hf", "deepsuite"),
        default="hf",
        help="hf: config.json + HF key names (transformers reads it); deepsuite: model.yaml + deepsuite "
        "key names (default hf)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    _add_no_verify(p)


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", metavar="PATH", help="run folder, step_N folder, deepsuite model folder or HF folder"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    _add_no_verify(p)


# subcommands that are also stand-alone scripts in tools/: name -> (help, argument setup)
_TOOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "convert": (
        "convert checkpoints between deepsuite, training (ZeRO) and Hugging Face formats",
        _add_convert_arguments,
    ),
    "consolidate": (
        "a training checkpoint (any ZeRO stage) → one safetensors folder (HF or deepsuite)",
        _add_consolidate_arguments,
    ),
    "inspect": (
        "describe and check a checkpoint: model, step, tokens, parameters, dtypes, shard layout",
        _add_inspect_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="deepsuite",
        description="Train DeepSeek-V3 and GPT models with DeepSpeed: data preparation, training, "
        "generation, checkpoint conversion, consolidation and inspection, and size planning.",
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
        description="Read data.source, split documents into train/val, train a byte-fallback BPE tokenizer "
        "(SentencePiece) or load data.tokenizer (a SentencePiece .model, or a Hugging Face tokenizer.json / model "
        "folder), and write token shards + meta.json into data.out_dir.",
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
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="run folder or step_N checkpoint folder, or a model folder (HF or deepsuite) holding its tokenizer",
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
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-document token (by default the sample ends there)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="DeepSeek-V3 with MTP: greedy decoding drafted by the MTP module and verified by the main model "
        "(same tokens as --temperature 0); prints the acceptance rate on stderr",
    )
    _add_no_verify(p)

    for name, (text, add_arguments) in _TOOLS.items():
        add_arguments(sub.add_parser(name, help=text, description=_DESCRIPTIONS[name]))

    p = sub.add_parser(
        "plan",
        help="per-GPU memory and all-to-all traffic of a model on a cluster layout",
        description="Count the model's parameters on the meta device and print per-GPU parameter, gradient, "
        "optimizer and activation memory and all-to-all bytes per step for nodes × GPUs × ZeRO stage × "
        "ep_size × micro-batch × sequence length; says what does not fit and which layouts would.",
    )
    add_plan_arguments(p)
    return parser


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """`deepsuite train`."""
    cfg = _config(args)
    check_optional_packages(cfg)  # a backend asked for by name is installed, --dry-run included
    if os.environ.get("RANK", "0") == "0":  # one warning per run, not per rank
        check_schedule(cfg)
    resume = None
    if args.resume and cfg.checkpoint.resume == "never":
        raise ConfigError("--resume contradicts checkpoint.resume=never; drop one of them")
    if args.resume:
        from deepsuite.checkpoint.manager import CheckpointError, find_checkpoint

        path = cfg.checkpoint.resume if cfg.checkpoint.resume not in ("auto", "never") else cfg.checkpoint.dir
        try:
            resume = str(find_checkpoint(path))
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}") from None
    if args.dry_run:
        from deepsuite.training.trainer import dry_run

        print(dry_run(cfg, resume=resume))
        return 0
    from deepsuite.training.trainer import train

    train(cfg, resume=resume)  # the process group is left to the atexit handler of init_distributed
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """`deepsuite prepare-data`."""
    from deepsuite.data.prepare import prepare_data

    prepare_data(_config(args).data, force=args.force)
    return 0


def _check_sampling_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k={args.top_k} must be >= 0 (0 = off)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ConfigError(
            f"--top-p={args.top_p} must be in (0, 1]; leave it out to turn nucleus sampling off"
        )


def _model_and_tokenizer(source: str, verify: bool = True) -> tuple[typing.Any, typing.Any]:
    """The model in `source` (an HF or deepsuite model folder, a run folder or a step_N folder) and
    the tokenizer stored with it; checked against its checksums first (``verify``)."""
    from deepsuite.checkpoint.init_from import load_source_model
    from deepsuite.data.tokenizer import Tokenizer

    model, _, tok_file = load_source_model(Path(source), verify=verify)
    if tok_file is None:
        raise ConfigError(
            f"{source} holds no tokenizer (tokenizer.model or tokenizer.json); export the model from its training "
            "run (deepsuite convert ... copies the run's tokenizer) or copy the tokenizer into the folder"
        )
    return model, Tokenizer(tok_file)


def cmd_generate(args: argparse.Namespace) -> int:
    """`deepsuite generate`: the sampling flags are checked before the checkpoint is looked for."""
    from deepsuite.generation.text import encode_prompt, generate_text

    _check_sampling_flags(args)
    model, tok = _model_and_tokenizer(args.checkpoint, verify=args.verify)
    ids, fits = encode_prompt(model, tok, args.prompt, args.max_new_tokens, speculative=args.speculative)
    if fits < args.max_new_tokens:  # then prompt + fits tokens fill the model's max_seq_len
        print(
            f"note: --max-new-tokens {args.max_new_tokens} shortened to {fits} "
            f"(prompt {len(ids)} tokens, max_seq_len {len(ids) + fits})",
            file=sys.stderr,
        )
    text = generate_text(
        model,
        tok,
        args.prompt,
        fits,
        temperature=0.0 if args.speculative else args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        speculative=args.speculative,
        stop_at_eos=not args.ignore_eos,
    )
    print(text)
    if args.speculative:
        stats = model.last_generation_stats
        print(
            f"MTP speculative decoding: {stats['acceptance_rate']:.1%} of {stats['drafted']} drafted tokens accepted, "
            f"{stats['main_passes']} main-model passes for {stats['new_tokens']} tokens",
            file=sys.stderr,
        )
    return 0


@contextlib.contextmanager
def _destination(dst: str, overwrite: bool) -> Iterator[None]:
    """Refuse DST before the (possibly long) load: a file, or a non-empty folder without --overwrite;
    a DST that appears meanwhile is refused with the same words."""
    path = Path(dst)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder; remove it or choose another DST")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise ConfigError(f"{path} exists and is not empty; pass --overwrite to replace it")
    try:
        yield
    except FileExistsError as exc:
        raise ConfigError(str(exc).replace("pass overwrite=True", "pass --overwrite")) from None


def cmd_convert(args: argparse.Namespace) -> int:
    """`deepsuite convert`: DST is checked before SRC is read; a bad SRC exits 2 with one line."""
    from deepsuite.checkpoint import convert

    fn = {
        "hf-to-deepsuite": convert.hf_to_deepsuite,
        "deepsuite-to-hf": convert.deepsuite_to_hf,
        "zero-to-hf": convert.zero_to_hf,
    }[args.conversion]
    with _destination(args.dst, args.overwrite):
        out = fn(
            args.src, args.dst, overwrite=args.overwrite, dtype=convert.DTYPES[args.dtype], verify=args.verify
        )
    print(f"wrote {out}")
    return 0


def _checkpoint_to_consolidate(src: str, step: str | None) -> Path:
    from deepsuite.checkpoint.manager import DS_TAG, STATE_FILE, CheckpointError, find_checkpoint, step_dirs

    root = Path(src)
    if root.name == DS_TAG and (root.parent / STATE_FILE).is_file():  # step_N/deepspeed given
        root = root.parent
    if step is None:
        return find_checkpoint(root)
    name = step if step.startswith("step_") else f"step_{step}"
    if (root / STATE_FILE).is_file():  # a step_N folder itself
        if root.name == name:
            return root
        raise CheckpointError(
            f"--step {step} picks a checkpoint inside a run folder, but {root} is itself a checkpoint "
            f"({root.name}); pass the run folder {root.parent} with --step, or {root} without it"
        )
    if not (root / name / STATE_FILE).is_file():
        have = [p.name for _, p in step_dirs(root) if (p / STATE_FILE).is_file()]
        raise CheckpointError(
            f"--step {step}: {root / name} is not a complete checkpoint "
            f"(complete ones in {root}: {', '.join(have) or 'none'})"
        )
    return root / name


def cmd_consolidate(args: argparse.Namespace) -> int:
    """`deepsuite consolidate`: the road of `deepsuite convert zero-to-hf`, with --step and --format."""
    from deepsuite.checkpoint.convert import consolidate_checkpoint

    path = _checkpoint_to_consolidate(args.src, args.step)
    with _destination(args.dst, args.overwrite):
        out, state = consolidate_checkpoint(
            path, args.dst, format=args.format, overwrite=args.overwrite, verify=args.verify
        )
    print(f"wrote {out} ({args.format}, fp32) from {path} (step {state['step']}, ZeRO-{state['zero_stage']})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`deepsuite inspect`."""
    import json

    from deepsuite.checkpoint.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path, verify=args.verify)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`deepsuite plan`."""
    return plan_main(args)


_COMMANDS = {
    "train": cmd_train,
    "prepare-data": cmd_prepare_data,
    "generate": cmd_generate,
    "convert": cmd_convert,
    "consolidate": cmd_consolidate,
    "inspect": cmd_inspect,
    "plan": cmd_plan,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    # the torch-side error classes count once their modules are loaded (they raise nothing before)
    errors: list[type[BaseException]] = [ConfigError, DataError, NotImplementedError]
    for module, name in (
        ("deepsuite.checkpoint.manager", "CheckpointError"),
        ("deepsuite.checkpoint.hf_io", "CheckpointFormatError"),
        ("deepsuite.checkpoint.atomic", "CheckpointWriteError"),
        ("deepsuite.generation.text", "GenerationError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        trainer = sys.modules.get("deepsuite.training.trainer")
        if trainer is not None and isinstance(exc, trainer.TrainingDivergedError):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_DIVERGED
        if trainer is not None and isinstance(exc, trainer.TrainingStopped):
            print(f"stopped: {_one_line(exc)}", file=sys.stderr)
            return 128 + int(exc.signum)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `deepsuite` console script; returns the exit status."""
    return _run(build_parser().parse_args(argv))


def tool_main(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of a `tools/` script: the `deepsuite <command>` subcommand (`convert`,
    `consolidate` or `inspect`) with its own program name; same arguments, errors and exit status."""
    add_arguments = _TOOLS[command][1]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{_DESCRIPTIONS[command]} Same as `deepsuite {command}`.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = command
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
