"""The split LM head under ZeRO-3 on 2 ranks vs one process with the whole batch: same losses, same
trained weights. Its forward reads its children's weights without calling them; ZeRO-3 gathers them
because they are read inside a module forward (DeepSpeed registers them as that module's external
parameters), which is why the plain LM head computes its loss in its own forward too."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import init, write

args = init()

from deepsuite.heads import SplitLanguageModellingHead  # noqa: E402
from deepsuite.parallel.deepspeed import import_deepspeed  # noqa: E402

deepspeed = import_deepspeed()
rank, world = dist.get_rank(), dist.get_world_size()
MICRO, T, STEPS, LR, H = 2, 16, args.steps, 1e-2, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(48, H)
        self.proj = nn.Linear(H, H)
        self.head = SplitLanguageModellingHead({"regular": 40, "special": 8}, ["regular", "special"], H)
        self.head.loss_backend = "chunked"
        self.head.loss_chunk_size = 8  # several chunks: the fused path, not one full-logits matmul

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(tokens[:, :-1])))
        return self.head(h, tokens[:, 1:]).mean()


torch.manual_seed(0)
base = TinyLM()
g = torch.Generator().manual_seed(3)
# learnable: counting sequences from random starts (random tokens would not train)
data = [
    (torch.randint(0, 48, (MICRO * world, 1), generator=g) + torch.arange(T + 1)) % 48 for _ in range(STEPS)
]

ref = copy.deepcopy(base)
opt = torch.optim.AdamW(ref.parameters(), lr=LR)
ref_losses = []
for tokens in data:
    loss = ref(tokens)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ref_losses.append(loss.item())

model = copy.deepcopy(base)
ds_config = {
    "train_batch_size": MICRO * world,
    "train_micro_batch_size_per_gpu": MICRO,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}
engine, *_ = deepspeed.initialize(
    model=model,
    optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
    config=ds_config,
    dist_init_required=False,
)
losses = []
for tokens in data:
    loss = engine(tokens[rank * MICRO : (rank + 1) * MICRO])
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)
rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    worst = max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(engine.module.parameters(), ref.parameters())
    )
write(args, {"losses": losses, "ref": ref_losses, "max_rel": rel, "weights_max_abs": worst})
