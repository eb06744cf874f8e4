"""The real trainer (`deepsuite.training.trainer.train`) for each case of ``--cases`` in one process
group: ``<model>:z<stage>[:ep<size>]`` with model in gpt_tied, gpt_untied, dsv3 (the default
DeepSeek-V3 with one MTP module, shrunk to 2 layers of d 64). Writes per case the loss and gradient
norm of every step, the router biases after training and whether they are bit-identical on every
rank.
Options after the stage: ``resume`` also saves at step 5 and resumes a second run from it (losses
of steps 6-10 and final biases written beside the uninterrupted run's); ``bytes`` measures this
rank's parameter, gradient and optimizer bytes on the first step (engine and experts held outside
it), for the comparison with `deepsuite plan`.

Run once on 1 rank with ``z0`` cases (the fp32 reference) and once on 2 or 4 ranks; the test
compares the two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    MODELS,
    RouterBiases,
    grad_bytes,
    init,
    optimizer_bytes,
    param_bytes,
    training_settings,
    write,
)

args = init()

from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.parallel.dist import destroy_distributed  # noqa: E402
from deepsuite.parallel.expert_parallel import held_experts  # noqa: E402
from deepsuite.training.trainer import Trainer, train  # noqa: E402

STEPS = args.steps
biases = RouterBiases()


def config(case: str, run: Path, suffix: str = "") -> Any:
    """``<model>:z<stage>`` then options: ``ep<size>``, ``ckpt`` (activation checkpointing),
    ``naive`` (the full-logits loss backend instead of the chunked fused one)."""
    model, stage, *options = case.split(":")
    ep = next((int(o.removeprefix("ep")) for o in options if o.startswith("ep")), 1)
    return config_from_dict(
        {
            "model": MODELS[model],
            "data": {"out_dir": "data/shakespeare"},
            # one case proves the end-of-run speculative decoding report under ZeRO-3 on 2 ranks
            "training": training_settings(STEPS, report_mtp_acceptance=case == "dsv3:z3"),
            "schedule": {"warmup_steps": 2},
            "parallel": {
                "zero_stage": int(stage.removeprefix("z")),
                "ep_size": ep,
                "activation_checkpointing": "ckpt" in options,
            },
            "loss": {"backend": "naive" if "naive" in options else "chunked", "chunk_size": 16},
            "checkpoint": {"dir": str(run / f"ckpt{suffix}"), "every": 5 if "resume" in options else 0},
            "logging": {"run_dir": str(run / f"log{suffix}"), "progress": False, "log_every": 1},
        }
    )


def _grad_norms(run_dir: Path) -> list[float]:
    """The gradient norm of every step (before clipping), from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_measured: dict[str, int] = {}
_measure_case = False
_train_step = Trainer.train_step


def _measuring_train_step(self: Trainer) -> dict[str, float]:
    """The first step of a ``bytes`` case, measured: parameters before it, gradients at the
    accumulation boundary (after the experts' reduction), optimizer states after it."""
    if _measured or not _measure_case:
        return _train_step(self)
    engine, held = self.engine, held_experts(self.engine)
    extra = (lambda f: f(held)) if held is not None else (lambda f: 0)
    _measured["params"] = param_bytes(engine) + extra(lambda h: _nbytes(h.params.values()))
    step = engine.step

    def measuring_step() -> None:
        if engine.is_gradient_accumulation_boundary():
            grads = extra(lambda h: _nbytes(m.grad for m in h.masters.values() if m.grad is not None))
            _measured["grads"] = grad_bytes(engine) + grads
        step()

    engine.step = measuring_step
    try:
        metrics = _train_step(self)
    finally:
        engine.step = step
    states = extra(
        lambda h: _nbytes(v for st in h.optimizer.state.values() for v in st.values() if v.dim() > 0)
    )
    masters = extra(lambda h: _nbytes(m for n, m in h.masters.items() if m is not h.params[n]))
    _measured["optimizer"] = optimizer_bytes(engine) + states + masters
    return metrics


Trainer.train_step = _measuring_train_step  # type: ignore[method-assign]


result: dict[str, Any] = {}
for case in [c for c in args.cases.split(",") if c]:
    biases.clear()
    _measured.clear()
    _measure_case = "bytes" in case.split(":")
    run = args.dir / case.replace(":", "_")
    cfg = config(case, run)
    out = train(cfg)
    flat, identical = biases.gathered()
    result[case] = {
        "losses": out.losses,
        "grad_norms": _grad_norms(Path(cfg.logging.run_dir)) if dist.get_rank() == 0 else [],
        "biases": flat.tolist(),
        "biases_identical_on_ranks": identical,
        "moved_biases": bool(flat.abs().sum() > 0),
        "mtp_acceptance": out.mtp_acceptance,
    }
    if _measured:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, dict(_measured))
        result[case]["bytes_per_rank"] = every
    if "resume" in case.split(":"):
        # a second run from the step-5 checkpoint, into its own checkpoint folder
        biases.clear()
        _measure_case = False
        resumed = train(config(case, run, "_resumed"), resume=str(run / "ckpt" / "step_5"))
        flat, identical = biases.gathered()
        result[case]["resumed"] = {
            "start_step": resumed.start_step,
            "losses": resumed.losses,
            "biases": flat.tolist(),
            "biases_identical_on_ranks": identical,
        }
write(args, result)
# leave through the library's teardown: DeepSpeed's expert groups otherwise outlive the process
# group, and an exit on 4 ranks sometimes aborted with SIGABRT after a successful run
destroy_distributed()
