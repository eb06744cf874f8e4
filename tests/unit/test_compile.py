"""`parallel.compile`: torch.compile of each block gives the eager numbers, and a DeepSeek-V3 with
MoE compiles once (the routed-expert section runs eagerly instead of recompiling per routing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from deepsuite.models import build_model
from deepsuite.parallel.parallelize import apply_compile


def _train(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[list[float], list[int]]:
    """Losses and, after each step, how many distinct graphs dynamo has compiled so far."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, graphs = [], []
    for ids in batches:
        loss = model(ids, labels=ids.roll(-1, 1)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, graphs


@pytest.mark.parametrize(
    ("name", "flavor", "backend"),
    # inductor for GPT (its generated kernels give the eager numbers); DeepSeek-V3's point is dynamo's
    # graph count, which is the same under aot_eager without a minute of C++ code generation on CPU
    [("gpt", "gpt2-debug", "inductor"), ("deepseek_v3", "deepseek-v3-debug", "aot_eager")],
)
def test_compiled_blocks_train_like_eager_without_recompiling(
    name: str, flavor: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch._dynamo.reset()
    counters.clear()
    compile_block = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_block(self, **{"backend": backend, **kw})
    )
    torch.manual_seed(0)
    eager = build_model(name=name, flavor=flavor, device="cpu")
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled) == len(compiled.layers)
    vocab = eager.args.vocab_size
    # a new batch every step: new routings for the MoE layers
    batches = [torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ref_losses, _ = _train(eager, batches)
    losses, graphs = _train(compiled, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert graphs[0] > 0  # something was compiled
    assert graphs[1:] == [graphs[1]] * 3, f"dynamo compiled new graphs on later steps: {graphs}"
    for p_ref, p in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5)
