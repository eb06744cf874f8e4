"""Real Transformer Engine on CUDA (skipped unless transformer_engine imports and FP8 runs)."""

from __future__ import annotations

import pytest
import torch

from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import prepare_fp8

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def te():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    te = pytest.importorskip("transformer_engine.pytorch", reason="transformer_engine is not installed")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("TE FP8 needs compute capability >= 8.9")
    return te


@pytest.mark.parametrize("recipe", ["delayed", "current", "block", "mxfp8"])
def test_te_gpt_and_deepseek_train_step(te, recipe: str) -> None:
    from deepsuite.fp8.te import recipe_unsupported_reason
    from deepsuite.models import build_model

    reason = recipe_unsupported_reason(recipe)
    if reason is not None:
        pytest.skip(reason)
    for name, flavor in [("gpt", "gpt2-debug"), ("deepseek_v3", "deepseek-v3-debug")]:
        torch.manual_seed(0)
        ref = build_model(name=name, flavor=flavor, device="cuda")
        model = build_model(name=name, flavor=flavor, device="cuda")
        model.load_state_dict(ref.state_dict())
        ctx = prepare_fp8(model, FP8Config(enabled=True, backend="te", recipe=recipe))
        assert ctx.backend == "te", ctx.summary
        ids = torch.randint(0, model.args.vocab_size, (4, 64), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_ref = ref(ids, labels=ids.roll(-1, 1)).loss
            with ctx.autocast():
                loss = model(ids, labels=ids.roll(-1, 1)).loss
        loss.backward()
        assert abs(loss.item() - loss_ref.item()) < 0.02 * loss_ref.item(), (name, recipe)
