"""`deepsuite.training.trainer.train` with EP=2 × ZeRO-2 on 2 ranks, through the integration points.

Until the trainer calls them itself (see the integration notes in `deepsuite.parallel.expert_parallel`),
this worker installs them by monkeypatching: `parallelize_experts` in `parallelize_model`, MoE
optimizer groups in `build_optimizer` and expert shards around the engine's checkpoint save/load
(consolidation finds the shards by itself). With `--native` it patches nothing (the trainer is
expected to integrate).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import init, write

args = init()

from deepsuite.config.loader import config_from_dict  # noqa: E402
from deepsuite.parallel.deepspeed import import_deepspeed  # noqa: E402

deepspeed = import_deepspeed()
rank = dist.get_rank()
native = args.native


def install_integration() -> None:
    import deepsuite.parallel.parallelize as parallelize
    import deepsuite.training.optim as optim
    from deepsuite.parallel.expert_parallel import load_expert_shards, parallelize_experts, save_expert_shards
    from deepsuite.parallel.groups import optimizer_param_groups

    original_parallelize = parallelize.parallelize_model

    def parallelize_model(model, dims, cfg):  # type: ignore[no-untyped-def]
        model = parallelize_experts(model, dims.world_size, cfg.parallel.zero_stage, cfg.parallel.ep_size)
        rest = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_size=1))
        return original_parallelize(model, dims, rest)

    parallelize.parallelize_model = parallelize_model

    def build_optimizer(model, cfg):  # type: ignore[no-untyped-def]
        groups = [
            dict(g, name=f"group{i}") for i, g in enumerate(optim.param_groups(model, cfg.weight_decay))
        ]
        return torch.optim.AdamW(
            optimizer_param_groups(groups), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps
        )

    optim.build_optimizer = build_optimizer

    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    save, load = engine_cls.save_checkpoint, engine_cls.load_checkpoint

    def save_checkpoint(self, save_dir, tag=None, *a, **k):  # type: ignore[no-untyped-def]
        out = save(self, save_dir, tag, *a, **k)
        save_expert_shards(self, Path(save_dir) / str(tag))
        dist.barrier()
        return out

    def load_checkpoint(self, load_dir, tag=None, *a, **k):  # type: ignore[no-untyped-def]
        out = load(self, load_dir, tag, *a, **k)
        load_expert_shards(self, Path(load_dir) / str(tag))
        return out

    engine_cls.save_checkpoint, engine_cls.load_checkpoint = save_checkpoint, load_checkpoint


if not native:
    install_integration()

from deepsuite.training.trainer import train  # noqa: E402


def config(run: Path, ep: int, steps: int, per_run: int = 0) -> object:
    return config_from_dict(
        {
            "model": {"name": "deepseek_v3", "flavor": "deepseek-v3-debug", "n_layers": 2, "d_model": 64},
            "data": {"out_dir": "data/shakespeare"},
            "training": {
                "steps": steps,
                "seq_len": 32,
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "eval_every": 1000,
                "eval_batches": 1,
                "sample_tokens": 8 if native else 0,  # generation under EP is collective (trainer edit)
                "report_mtp_acceptance": native,  # speculative decoding under EP: once is enough
                "max_steps_per_run": per_run,
                "router_bias_update_rate": 0.01,
            },
            "schedule": {"warmup_steps": 2},
            "parallel": {"zero_stage": 2, "ep_size": ep},
            "checkpoint": {"dir": str(run / "ckpt"), "every": 5},
            "logging": {"run_dir": str(run / "log"), "progress": False, "log_every": 1},
        }
    )


def losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "log" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = float(rec["loss"])
    return out


base = args.dir
ep2, ep1, resumed = base / "ep2", base / "ep1", base / "ep2_resumed"
train(config(ep2, ep=2, steps=10))
train(config(ep1, ep=1, steps=10))
train(config(resumed, ep=2, steps=10, per_run=5))  # stops after step 5 (checkpointed) ...
train(config(resumed, ep=2, steps=10))  # ... and a new run resumes from it
dist.barrier()
result: dict = {}
if rank == 0:
    a, b, c = losses(ep2), losses(ep1), losses(resumed)
    result["ep2"], result["ep1"], result["resumed"] = a, b, c
    result["ep2_vs_ep1_max_rel"] = max(abs(a[s] - b[s]) / b[s] for s in b)
    result["resumed_vs_ep2_max_rel"] = max(abs(a[s] - c[s]) / a[s] for s in a)
    # convert zero-to-hf on the EP=2 × ZeRO-2 checkpoint; logits vs the EP=1 run's consolidated model
    from transformers import AutoModelForCausalLM

    from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
    from deepsuite.checkpoint.convert import zero_to_hf

    zero_to_hf(ep2 / "ckpt", base / "hf")
    hf = AutoModelForCausalLM.from_pretrained(base / "hf", torch_dtype=torch.float32).eval()
    ours, _, _ = load_model_from_checkpoint(ep2 / "ckpt")
    ref, _, _ = load_model_from_checkpoint(ep1 / "ckpt")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits, our_logits, ref_logits = hf(ids).logits, ours(ids), ref(ids)
    result["hf_vs_ours_max_abs"] = float((hf_logits - our_logits).abs().max())
    result["ep2_vs_ep1_logits_max_abs"] = float((our_logits - ref_logits).abs().max())
    # the validation loss on 2 ranks (eval_batches=1 × micro 4 = 4 windows: each rank runs one
    # micro-batch of 2 real windows and 2 padding copies) equals the plain mean next-token loss
    # of the same 4 windows in one process
    from deepsuite.data import TokenShards, eval_starts, windows_batch

    val = TokenShards(Path("data/shakespeare"), "val")
    inputs, labels = windows_batch(val, eval_starts(val, 32, 4), 32)
    with torch.no_grad():
        ref_val = float(ref(inputs, labels=labels).metrics["main_loss"])
    logged = [json.loads(x) for x in (ep1 / "log" / "metrics.jsonl").read_text().splitlines()]
    val_10 = [r["val_loss"] for r in logged if r.get("step") == 10 and "val_loss" in r]
    result["val_loss_vs_one_process_rel"] = abs(val_10[-1] - ref_val) / ref_val
    expert_shards = sorted(p.name for p in (ep2 / "ckpt" / "step_10" / "deepspeed").glob("expert_shard_*"))
    result["expert_shards"] = expert_shards
    # DeepSpeed's recovery scripts fail on expert shards: EP step folders do not carry them
    result["scripts"] = {
        run.name: sorted(p.name for p in (run / "ckpt" / "step_10").glob("*.py")) for run in (ep2, ep1)
    }
write(args, result)

# leave through the library teardown (DeepSpeed expert groups otherwise outlive the process group)
from deepsuite.parallel.dist import destroy_distributed  # noqa: E402

destroy_distributed()
