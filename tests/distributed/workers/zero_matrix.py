"""The real trainer (`deepsuite.training.trainer.train`) for each case of ``--cases`` in one process
group: ``<model>:z<stage>[:ep<size>]`` with model in gpt_tied, gpt_untied, dsv3 (the default
DeepSeek-V3 with one MTP module, shrunk to 2 layers of d 64). Writes per case the loss of every
step, the router biases after training and whether they are bit-identical on every rank.

Run once on 1 rank with ``z0`` cases (the fp32 reference) and once on 2 or 4 ranks; the test
compares the two.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import init, write

args = init()

from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.layers.moe import DeepSeekMoE  # noqa: E402
from deepsuite.parallel.dist import destroy_distributed  # noqa: E402
from deepsuite.training.trainer import train  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "gpt_tied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": True},
    "gpt_untied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": False},
    "dsv3": {"name": "deepseek_v3", "flavor": "deepseek-v3-debug", "n_layers": 2, "d_model": 64},
}
STEPS = args.steps

# The MoE layers that took a bias step, to read their biases once training is over.
_moe_layers: dict[int, DeepSeekMoE] = {}
_update_bias = DeepSeekMoE.update_bias


def _recording_update_bias(self: DeepSeekMoE, global_load: torch.Tensor, rate: float) -> None:
    _moe_layers[id(self)] = self
    _update_bias(self, global_load, rate)


DeepSeekMoE.update_bias = _recording_update_bias  # type: ignore[method-assign]


def config(case: str, run: Path) -> Any:
    """``<model>:z<stage>`` then options: ``ep<size>``, ``ckpt`` (activation checkpointing),
    ``naive`` (the full-logits loss backend instead of the chunked fused one)."""
    model, stage, *options = case.split(":")
    ep = next((int(o.removeprefix("ep")) for o in options if o.startswith("ep")), 1)
    return config_from_dict(
        {
            "model": MODELS[model],
            "data": {"out_dir": "data/shakespeare"},
            "training": {
                "steps": STEPS,
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
            "parallel": {
                "zero_stage": int(stage.removeprefix("z")),
                "ep_size": ep,
                "activation_checkpointing": "ckpt" in options,
            },
            "loss": {"backend": "naive" if "naive" in options else "chunked", "chunk_size": 16},
            "checkpoint": {"dir": str(run / "ckpt"), "every": 0},
            "logging": {"run_dir": str(run / "log"), "progress": False, "log_every": 1},
        }
    )


result: dict[str, Any] = {}
for case in [c for c in args.cases.split(",") if c]:
    _moe_layers.clear()
    out = train(config(case, args.dir / case.replace(":", "_")))
    biases = [m.gate.e_score_correction_bias.detach().clone() for m in _moe_layers.values()]
    flat = torch.cat(biases) if biases else torch.zeros(0)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    result[case] = {
        "losses": out.losses,
        "biases": flat.tolist(),
        "biases_identical_on_ranks": all(torch.equal(g, flat) for g in gathered),
        "moved_biases": bool(flat.abs().sum() > 0),
    }
write(args, result)
# leave through the library's teardown: DeepSpeed's expert groups otherwise outlive the process
# group, and an exit on 4 ranks sometimes aborted with SIGABRT after a successful run
destroy_distributed()
