"""The real trainer for the resharding test, one or more cases per launch: ``--cases`` is a comma-separated
list of ``<model>:z<stage>[:ep<size>][:bf16]:<mode>:<run>``, each run in ``<dir>/<run>``, with mode
``full`` (all ``--steps`` steps), ``every<k>`` (all steps, a checkpoint every k), ``first<k>`` (k steps,
then the checkpoint ``max_steps_per_run`` writes), ``resume`` (plain resume of the newest checkpoint in
``<dir>/<run>/ckpt``, on this world, stage and ep size) or ``from-<src>`` (load the newest checkpoint of
run ``<src>`` on this layout and save it again at once, into ``<dir>/<run>/ckpt``: no step in
between). Writes per run the losses of the steps it trained, the router biases after them and whether
every rank holds the very same, and, from rank 0, the consolidated weights of the final checkpoint
(``<dir>/<run>/weights.safetensors``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import MODELS, RouterBiases, init, training_settings, write

args = init()

import torch.distributed as dist  # noqa: E402

from deepsuite.checkpoint.consolidate import consolidated_state_dict  # noqa: E402
from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.parallel.dist import destroy_distributed, restore_torch_linear  # noqa: E402
from deepsuite.training.trainer import Trainer, train  # noqa: E402

biases = RouterBiases()


def config(model: str, stage: str, ep: int, mode: str, run: Path, dtype: str = "fp32") -> Any:
    return config_from_dict(
        {
            "model": MODELS[model],
            "data": {"out_dir": "data/shakespeare"},
            "training": training_settings(
                args.steps,
                dtype,
                max_steps_per_run=int(mode.removeprefix("first")) if mode.startswith("first") else 0,
            ),
            "schedule": {"warmup_steps": 2},
            "parallel": {"zero_stage": int(stage.removeprefix("z")), "ep_size": ep},
            "loss": {"backend": "chunked", "chunk_size": 16},
            "checkpoint": {
                "dir": str(run / "ckpt"),
                "every": int(mode.removeprefix("every")) if mode.startswith("every") else 0,
                "resume": "auto" if mode == "resume" else "never",
                "keep_last": 100,  # step K of an ``every`` run is a resume source
            },
            "logging": {"run_dir": str(run / f"log-{mode}"), "progress": False, "log_every": 1},
        }
    )


result: dict[str, Any] = {}
for case in [c for c in args.cases.split(",") if c]:
    model, stage, *options, mode, name = case.split(":")
    ep = next((int(o.removeprefix("ep")) for o in options if o.startswith("ep")), 1)
    run = args.dir / name
    biases.clear()
    cfg = config(model, stage, ep, mode, run, "bf16" if "bf16" in options else "fp32")
    if mode.startswith("from-"):
        trainer = Trainer(cfg, resume=str(args.dir / mode.removeprefix("from-") / "ckpt"))
        trainer.load()
        trainer.save()
        del trainer
        restore_torch_linear()
        result[name] = {"saved": True}
        continue
    out = train(cfg)
    flat, identical = biases.gathered()
    if dist.get_rank() == 0 and out.end_step == args.steps:
        weights = consolidated_state_dict(out.checkpoint)
        save_file({k: v.contiguous().clone() for k, v in weights.items()}, run / "weights.safetensors")
    result[name] = {
        "losses": out.losses,
        "start": out.start_step,
        "end": out.end_step,
        "biases": flat.tolist(),
        "biases_identical_on_ranks": identical,
    }
write(args, result)
destroy_distributed()
