"""Save-time cost of checkpoint checksums: `save_checkpoint` of the `deepseek-v3-small` flavor with
and without hashing, in the same process.

One CPU rank (a world of one), ZeRO-``--zero-stage`` (default 1: the model states file and the
optimizer partition file), fp32, torch AdamW after one optimizer step (so its moments exist): the
real save path (DeepSpeed's engine save, RNG states, config, state.json, fsync of every file and
folder, rename, `latest`), saved ``--repeats`` times each way in alternating order (A B, B A, …) so
that a changing machine load hits both alike. With hashing each rank hashes its files right after
writing them (page cache) and rank 0 writes manifest.json; without, no manifest (the older layout).
The ratio is median(with) / median(without); the goal (issue 16) is at most 1.05.

    python tools/benchmarks/checkpoint_save.py [--quick] [--repeats 6] [--zero-stage 1] [--dir DIR] [--json PATH]

``--dir`` is the folder the checkpoints are written in (default: the system's temporary folder; on
this machine the same disk as the runs, not a RAM disk); each is deleted before the next save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from common import env_info, print_table, run_isolated, write_json  # noqa: E402

GOAL = 1.05
FLAVOR = "deepseek-v3-small"


def _engine(zero_stage: int, seq_len: int) -> tuple[Any, Any]:
    """A DeepSpeed engine of the flavor, built as the trainer builds it, after one optimizer step."""
    from deepsuite.config import load_config
    from deepsuite.models.registry import build_model, get_model_spec
    from deepsuite.parallel.deepspeed import build_ds_config, initialize_engine
    from deepsuite.parallel.dist import init_distributed
    from deepsuite.training.optim import build_optimizer, build_scheduler
    from deepsuite.training.trainer import configure_model

    cfg = load_config(
        None,
        [
            "model.name=deepseek_v3",
            f"model.flavor={FLAVOR}",
            f"parallel.zero_stage={zero_stage}",
            "training.dtype=fp32",
            f"training.seq_len={seq_len}",
            "training.global_batch_size=1",
            "training.micro_batch_size=1",
            "training.steps=10",
            "schedule.warmup_steps=1",
        ],
    )
    dims = init_distributed(cfg.parallel.backend, cfg.parallel.ep_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, device=dims.device)
    configure_model(model, cfg)
    model = get_model_spec(cfg.model.name).parallelize_fn()(model, dims, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.steps)
    engine = initialize_engine(model, optimizer, scheduler, build_ds_config(cfg, dims))
    vocab = cfg.model.resolved_args.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len + 1))
    out = engine(ids[:, :-1], labels=ids[:, 1:])
    engine.backward(out.loss)
    engine.step()
    return engine, cfg


def _save(engine: Any, cfg: Any, root: Path, step: int, checksums: bool) -> tuple[float, int]:
    """Seconds of one `save_checkpoint` into a fresh ``root`` and the bytes it wrote."""
    from deepsuite.checkpoint.manager import save_checkpoint

    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    path = save_checkpoint(
        engine,
        root,
        step,
        cfg=cfg,
        rank=0,
        world_size=1,
        sampler_state={"epoch": 0, "position": 0},
        tokens_seen=0,
        tokenizer_path=None,
        checksums=checksums,
    )
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return seconds, size


def run(
    quick: bool = False, repeats: int = 6, zero_stage: int = 1, out_dir: str | None = None
) -> dict[str, Any]:
    """Median save time with and without checksums, alternating, after one untimed save of each; in
    a fresh process (it sets up a world of one)."""
    args = {"repeats": 2 if quick else repeats, "zero_stage": zero_stage, "out_dir": out_dir}
    return run_isolated(__file__, args)


def worker(repeats: int, zero_stage: int, out_dir: str | None) -> dict[str, Any]:
    """The measurement (see `run`)."""
    from deepsuite.checkpoint.checksums import MANIFEST_FILE, check_folder, hash_folder

    engine, cfg = _engine(zero_stage, seq_len=64)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=out_dir) as tmp:
        root = Path(tmp) / "run"
        _save(engine, cfg, root, 1, True)  # warm-up (first-time imports, allocator)
        verdict = check_folder(root / "step_1")
        assert verdict.verified and verdict.damage is None, verdict
        _save(engine, cfg, root, 1, False)
        assert not (root / "step_1" / MANIFEST_FILE).exists()
        times: dict[bool, list[float]] = {True: [], False: []}
        size = 0
        for r in range(repeats):
            for checksums in (True, False) if r % 2 == 0 else (False, True):
                seconds, size = _save(engine, cfg, root, r + 2, checksums)
                times[checksums].append(seconds)
        # hashing alone, from the page cache, for the record
        path = root / f"step_{repeats + 1}"
        t0 = time.perf_counter()
        hash_folder(path)
        hash_seconds = time.perf_counter() - t0
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    n_params = sum(p.numel() for p in engine.module.parameters())
    return {
        "benchmark": "checkpoint_save",
        "flavor": FLAVOR,
        "parameters": n_params,
        "zero_stage": zero_stage,
        "checkpoint_bytes": size,
        "repeats": repeats,
        "seconds_with_checksums": times[True],
        "seconds_without_checksums": times[False],
        "median_with_s": with_s,
        "median_without_s": without_s,
        "hash_only_s": hash_seconds,
        "hash_gb_per_s": size / hash_seconds / 1e9,
        "ratios": {"save_with_over_without_checksums": with_s / without_s},
        "goal": f"<= {GOAL}",
        "meets_goal": with_s / without_s <= GOAL,
        "env": env_info("cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats each way")
    parser.add_argument("--repeats", type=int, default=6, help="timed saves each way (default 6)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage (default 1)")
    parser.add_argument(
        "--dir", default=None, help="folder to save into (default: the system's temporary folder)"
    )
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    result = run(quick=args.quick, repeats=args.repeats, zero_stage=args.zero_stage, out_dir=args.dir)
    print_table(
        [
            {
                "checksums": label,
                "median s": result[key],
                "runs": ", ".join(f"{s:.3f}" for s in result[runs]),
            }
            for label, key, runs in (
                ("on", "median_with_s", "seconds_with_checksums"),
                ("off", "median_without_s", "seconds_without_checksums"),
            )
        ]
    )
    ratio = result["ratios"]["save_with_over_without_checksums"]
    print(
        f"{result['parameters'] / 1e6:.1f}M parameters, {result['checkpoint_bytes'] / 2**20:.0f} MiB per checkpoint; "
        f"hashing alone {result['hash_only_s']:.3f} s ({result['hash_gb_per_s']:.1f} GB/s); "
        f"ratio {ratio:.3f} (goal <= {GOAL})"
    )
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
