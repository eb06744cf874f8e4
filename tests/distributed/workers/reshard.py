"""The real trainer for the resharding test, one or more cases per launch: ``--cases`` is a comma-separated
list of ``<model>:z<stage>[:ep<size>][:bf16]:<mode>:<run>``, each run in ``<dir>/<run>``, with mode
``full`` (all ``--steps`` steps), ``every<k>`` (all steps, a checkpoint every k), ``first<k>`` (k steps,
then the checkpoint ``max_steps_per_run`` writes), ``resume`` (plain resume of the newest checkpoint in
``<dir>/<run>/ckpt``, on this world, stage and ep size) or ``roundtrip`` (load the newest checkpoint of
``<dir>/<run>/source`` on this layout and save it again at once, into ``<dir>/<run>/ckpt``: no step in
between). Writes per run the losses of the steps it trained, the router biases after them and whether
every rank holds the very same, and, from rank 0, the consolidated weights of the final checkpoint
(``<dir>/<run>/weights.safetensors``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import init, write

args = init()

import torch.distributed as dist  # noqa: E402

from deepsuite.checkpoint.consolidate import consolidated_state_dict  # noqa: E402
from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.layers.moe import DeepSeekMoE  # noqa: E402
from deepsuite.parallel.dist import destroy_distributed, restore_torch_linear  # noqa: E402
from deepsuite.training.trainer import Trainer, train  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "gpt_tied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": True},
    "gpt_untied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": False},
    "dsv3": {"name": "deepseek_v3", "flavor": "deepseek-v3-debug", "n_layers": 2, "d_model": 64},
}

# The MoE layers that took a bias step, to read their biases once a run is over.
_moe_layers: dict[int, DeepSeekMoE] = {}
_update_bias = DeepSeekMoE.update_bias


def _recording_update_bias(self: DeepSeekMoE, global_load: torch.Tensor, rate: float) -> None:
    _moe_layers[id(self)] = self
    _update_bias(self, global_load, rate)


DeepSeekMoE.update_bias = _recording_update_bias  # type: ignore[method-assign]


def config(model: str, stage: str, ep: int, mode: str, run: Path, dtype: str = "fp32") -> Any:
    return config_from_dict(
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
                "dtype": dtype,
            },
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


def _biases() -> tuple[list[float], bool]:
    """The router biases of the last run and whether every rank holds the very same."""
    flat = torch.cat(
        [m.gate.e_score_correction_bias.detach().clone() for m in _moe_layers.values()] or [torch.zeros(0)]
    )
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return flat.tolist(), all(torch.equal(g, flat) for g in gathered)


result: dict[str, Any] = {}
for case in [c for c in args.cases.split(",") if c]:
    model, stage, *options, mode, name = case.split(":")
    ep = next((int(o.removeprefix("ep")) for o in options if o.startswith("ep")), 1)
    run = args.dir / name
    _moe_layers.clear()
    cfg = config(model, stage, ep, mode, run, "bf16" if "bf16" in options else "fp32")
    if mode == "roundtrip":
        trainer = Trainer(cfg, resume=str(run / "source"))
        trainer.load()
        trainer.save()
        del trainer
        restore_torch_linear()
        result[name] = {"saved": True}
        continue
    out = train(cfg)
    biases, identical = _biases()
    if dist.get_rank() == 0 and out.end_step == args.steps:
        weights = consolidated_state_dict(out.checkpoint)
        save_file({k: v.contiguous().clone() for k, v in weights.items()}, run / "weights.safetensors")
    result[name] = {
        "losses": out.losses,
        "start": out.start_step,
        "end": out.end_step,
        "biases": biases,
        "biases_identical_on_ranks": identical,
    }
write(args, result)
destroy_distributed()
