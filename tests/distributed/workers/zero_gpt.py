"""ZeRO 1/2/3 under DeepSpeed on 2 ranks vs plain single-process AdamW on the same global batch (GPT debug)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import grad_bytes, init, optimizer_bytes, param_bytes, write

from deepsuite.models.registry import build_model
from deepsuite.parallel.deepspeed import import_deepspeed

args = init()
deepspeed = import_deepspeed()
rank, world = dist.get_rank(), dist.get_world_size()
MICRO, T, STEPS, LR = 2, 32, args.steps, 3e-3


def batches(vocab: int) -> list[torch.Tensor]:
    # Learnable: counting sequences mod 50 from random starts (random tokens would not train).
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        start = torch.randint(0, vocab, (MICRO * world, 1), generator=g)
        out.append((start + torch.arange(T + 1)) % 50)
    return out


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


torch.manual_seed(0)
base = build_model(name="gpt", flavor="gpt2-debug")
data = batches(base.args.vocab_size)

# Reference: one process, the whole global batch, torch AdamW + clipping.
ref = copy.deepcopy(base)
opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
ref_losses = []
for tokens in data:
    loss = lm_loss(ref, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ref_losses.append(loss.item())

result: dict = {"ref": ref_losses}
for stage in (0, 1, 2, 3):
    model = copy.deepcopy(base)
    ds_config = {
        "train_batch_size": MICRO * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        # DeepSpeed's default 5e8-element buckets are allocated afresh every micro-step (2 GB each on
        # CPU: 80 of this worker's 135 s); the model has 0.38M parameters
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    losses = []
    measured = {"params": param_bytes(engine)}
    for tokens in data:
        loss = lm_loss(engine, tokens[rank * MICRO : (rank + 1) * MICRO])
        engine.backward(loss)
        measured.setdefault("grads", grad_bytes(engine))
        engine.step()
        measured.setdefault("optimizer", optimizer_bytes(engine))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    assert rel < 1e-5, f"ZeRO-{stage}: max relative loss difference {rel:.3e}"
    assert losses[-1] < losses[0] - 0.1, f"ZeRO-{stage} did not train: {losses[0]} -> {losses[-1]}"
    result[f"zero{stage}"] = losses
    result[f"zero{stage}_max_rel"] = rel
    result[f"zero{stage}_bytes"] = measured
    if args.dir is not None:
        # consolidation of this stage's checkpoint (DeepSpeed's zero_to_fp32 for ZeRO-1/2/3) == the weights
        from deepsuite.checkpoint.consolidate import consolidated_state_dict

        engine.save_checkpoint(str(args.dir / f"zero{stage}"), tag="final")
        dist.barrier()
        sd = consolidated_state_dict(args.dir / f"zero{stage}", tag="final")
        ref_sd = ref.state_dict()
        assert set(sd) >= {k for k, _ in ref.named_parameters()}, sorted(set(ref_sd) - set(sd))
        worst = max(float((sd[k] - v).abs().max()) for k, v in ref.named_parameters())
        assert worst < 1e-4, f"ZeRO-{stage}: consolidated weights differ from the reference by {worst}"
        result[f"zero{stage}_consolidated_max_abs"] = worst
    del engine, optimizer
write(args, result)
