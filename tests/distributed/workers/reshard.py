"""The real trainer for the resharding test: ``--cases <model>:z<stage>:<mode>`` with mode ``full``
(all ``--steps`` steps), ``first<k>`` (k steps, then the checkpoint ``max_steps_per_run`` writes) or
``resume`` (plain resume of the checkpoint in ``--dir``, on this world and stage). Writes the losses
of the steps it trained and, from rank 0, the consolidated weights of the final checkpoint
(``<dir>/weights.safetensors``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import init, write

args = init()

import torch.distributed as dist  # noqa: E402

from deepsuite.checkpoint.consolidate import consolidated_state_dict  # noqa: E402
from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.parallel.dist import destroy_distributed  # noqa: E402
from deepsuite.training.trainer import train  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "gpt_tied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": True},
    "gpt_untied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": False},
    "dsv3": {"name": "deepseek_v3", "flavor": "deepseek-v3-debug", "n_layers": 2, "d_model": 64},
}

model, stage, mode = args.cases.split(":")
run = args.dir
cfg = config_from_dict(
    {
        "model": MODELS[model],
        "data": {"out_dir": "data/shakespeare"},
        "training": {
            "steps": args.steps,
            "max_steps_per_run": int(mode.removeprefix("first")) if mode.startswith("first") else 0,
            "seq_len": 32,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "eval_every": 1000,
            "eval_batches": 1,
            "sample_tokens": 0,
            "router_bias_update_rate": 0.01,
            "grad_clip": 1.0,
            "dtype": "fp32",
        },
        "schedule": {"warmup_steps": 2},
        "parallel": {"zero_stage": int(stage.removeprefix("z"))},
        "loss": {"backend": "chunked", "chunk_size": 16},
        "checkpoint": {
            "dir": str(run / "ckpt"),
            "every": 0,
            "resume": "auto" if mode == "resume" else "never",
        },
        "logging": {"run_dir": str(run / f"log-{mode}"), "progress": False, "log_every": 1},
    }
)
out = train(cfg)
if dist.get_rank() == 0 and out.end_step == args.steps:
    weights = consolidated_state_dict(out.checkpoint)
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, run / "weights.safetensors")
write(args, {"losses": out.losses, "start": out.start_step, "end": out.end_step})
destroy_distributed()
