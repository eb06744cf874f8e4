"""EP=2 × ZeRO-k under DeepSpeed on 2 ranks vs one process (tiny DeepSeek-V3), plus a checkpoint round trip."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import grad_bytes, init, optimizer_bytes, param_bytes, write

from deepsuite.models.registry import build_model
from deepsuite.parallel.balancing import update_router_biases
from deepsuite.parallel.deepspeed import import_deepspeed
from deepsuite.parallel.expert_parallel import (
    apply_expert_parallel,
    expert_param_names,
    load_expert_shards,
    save_expert_shards,
)
from deepsuite.parallel.groups import init_parallel_groups, optimizer_param_groups

args = init()
deepspeed = import_deepspeed()
rank, world = dist.get_rank(), dist.get_world_size()
MICRO, T, STEPS, LR, RATE, V = 2, 16, args.steps, 3e-3, 0.01, 128
stages = [args.stage]


def make_base(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name="deepseek_v3", flavor="deepseek-v3-debug", vocab_size=V, n_layers=2)


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        start = torch.randint(0, V, (MICRO * world, 1), generator=g)
        out.append((start + torch.arange(T + 1)) % V)
    return out


def biases(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")])


base = make_base(0)
data = batches(STEPS + 2)

ref = copy.deepcopy(base)
opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
ref_losses = []
for tokens in data:
    loss = ref(tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for _, m in ref.moe_layers():
            m.update_bias(m.tokens_per_expert.clone(), RATE)
    ref_losses.append(loss.item())

groups = init_parallel_groups(ep_size=world, n_routed_experts=base.args.n_routed_experts)


def make_engine(stage: int, model: torch.nn.Module):
    apply_expert_parallel(model, groups)
    named = [{"params": [p for p in model.parameters()], "name": "all", "weight_decay": 0.1}]
    optimizer = torch.optim.AdamW(optimizer_param_groups(named), lr=LR)
    ds_config = {
        "train_batch_size": MICRO * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        # small buckets: DeepSpeed's default 5e8 elements are allocated afresh every micro-step (2 GB on CPU)
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            "reduce_bucket_size": 2_000_000,
            "allgather_bucket_size": 2_000_000,
        },
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    assert engine.has_moe_layers, "the engine must see the expert registration"
    return engine


def train_step(engine, tokens: torch.Tensor, measured: dict | None = None) -> float:
    mine = tokens[rank * MICRO : (rank + 1) * MICRO]
    loss = engine(mine[:, :-1], labels=mine[:, 1:]).loss
    engine.backward(loss)
    if measured is not None:
        measured.setdefault("grads", grad_bytes(engine))
    engine.step()
    if measured is not None:
        measured.setdefault("optimizer", optimizer_bytes(engine))
    update_router_biases(engine.module, RATE)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / world


import time  # noqa: E402

t0 = time.time()
result: dict = {"ref": ref_losses}
for stage in stages:
    engine = make_engine(stage, copy.deepcopy(base))
    expert_names = set(expert_param_names(engine.module))
    assert len(expert_names) == 2 * base.args.n_moe_layers + 2  # + the MTP block's MoE
    measured = {"params": param_bytes(engine)}
    losses = [train_step(engine, tokens, measured) for tokens in data[:STEPS]]
    result[f"stage{stage}_bytes"] = measured
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    # router biases: identical on both ranks (they are updated from the same all-reduced load)
    b = biases(engine.module)
    gathered = [torch.empty_like(b) for _ in range(world)]
    dist.all_gather(gathered, b)
    assert all(torch.equal(gathered[0], g) for g in gathered), "router biases differ between ranks"
    assert float(b.abs().max()) > 0, "biases never moved"
    result[f"stage{stage}"] = losses
    result[f"stage{stage}_max_rel"] = rel
    assert rel < 1e-5, f"EP={world} × ZeRO-{stage}: max relative loss difference {rel:.3e}"
    assert losses[-1] < losses[0] - 0.5, f"did not train: {losses[0]} -> {losses[-1]}"

    if args.dir is not None and stage == stages[-1]:
        # checkpoint round trip: a fresh engine (other init) loads and continues identically
        ckpt = args.dir / f"stage{stage}"
        engine.save_checkpoint(str(ckpt), tag="step20")
        save_expert_shards(engine, ckpt / "step20")
        dist.barrier()
        other = make_engine(stage, make_base(123))
        other.load_checkpoint(str(ckpt), tag="step20")
        assert load_expert_shards(other, ckpt / "step20") == 4
        for (n, p), (_, q) in zip(engine.module.named_parameters(), other.module.named_parameters()):
            assert torch.equal(p, q), f"rank {rank}: {n} differs after load"
        torch.testing.assert_close(biases(other.module), b, rtol=0, atol=0)
        cont = [train_step(e, tokens) for tokens in data[STEPS:] for e in (engine, other)]
        assert cont[0] == cont[1] and cont[2] == cont[3], f"resumed losses differ: {cont}"
        result["resumed"] = cont

        # consolidation: DeepSpeed files + expert shards -> full fp32 state dict -> HF folder
        from deepsuite.checkpoint.consolidate import consolidated_state_dict
        from deepsuite.checkpoint.hf import save_hf
        from deepsuite.checkpoint.hf_io import load_state_dict_strict
        from deepsuite.config.schema import ModelConfig
        from deepsuite.models.registry import build_model

        sd = consolidated_state_dict(ckpt, tag="step20")
        lo, hi = groups.layout.local_expert_range(base.args.n_routed_experts)
        fresh = make_engine(stage, make_base(7))
        fresh.load_checkpoint(str(ckpt), tag="step20")
        load_expert_shards(fresh, ckpt / "step20")
        for name, p in fresh.module.named_parameters():
            full = sd[name]
            torch.testing.assert_close(
                full[lo:hi] if name in expert_names else full, p.detach(), rtol=0, atol=0
            )
        assert sd["layers.1.ffn.experts.gate_up_proj"].shape[0] == base.args.n_routed_experts
        torch.testing.assert_close(
            sd["layers.1.ffn.gate.e_score_correction_bias"],
            dict(fresh.module.named_buffers())["layers.1.ffn.gate.e_score_correction_bias"],
        )
        fresh.module.eval()
        probe = data[0][:2, :-1]
        with torch.no_grad():
            live_logits = fresh.module(probe)  # the EP-sharded live model (all-to-all across ranks)
        if rank == 0:
            hf_dir = args.dir / "hf"
            model_cfg = ModelConfig(
                name="deepseek_v3", flavor="deepseek-v3-debug", args={"vocab_size": V, "n_layers": 2}
            )
            model = build_model(model_cfg, device="cpu", init=False)
            load_state_dict_strict(model, consolidated_state_dict(ckpt, tag="step20"), source=str(ckpt))
            save_hf(model, hf_dir)
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                hf_logits = hf(probe).logits
            torch.testing.assert_close(hf_logits, live_logits, rtol=1e-4, atol=1e-4)
            result["hf_max_abs_logit_diff"] = float((hf_logits - live_logits).abs().max())
        dist.barrier()
    del engine
    result[f"seconds_stage{stage}"] = time.time() - t0
write(args, result)

# leave through the library teardown (DeepSpeed expert groups otherwise outlive the process group)
from deepsuite.parallel.dist import destroy_distributed  # noqa: E402

destroy_distributed()
