"""DeepSpeed ZeRO 0/1/2/3 on 2 CPU ranks vs one process with the same global batch (GPT debug flavor),
and `deepsuite plan`'s parameter/gradient/optimizer bytes vs the tensors of those live engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_spawn import torchrun

from deepsuite.config.schema import ModelConfig
from deepsuite.parallel.plan import PlanInput, plan

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero_stages_match_single_process_and_plan(tmp_path: Path) -> None:
    res = torchrun(
        "zero_gpt.py", "--steps", "20", "--dir", str(tmp_path), out_json=tmp_path / "r.json", timeout=900
    )
    assert len(res["ref"]) == 20
    model = ModelConfig(name="gpt", flavor="gpt2-debug")
    for stage in (0, 1, 2, 3):
        losses = res[f"zero{stage}"]
        assert len(losses) == 20
        assert res[f"zero{stage}_max_rel"] < 1e-5, stage
        assert losses[-1] < losses[0] - 0.1  # it trained
        # the checkpoint consolidates (DeepSpeed's zero_to_fp32 / module states) to the trained weights
        assert res[f"zero{stage}_consolidated_max_abs"] < 1e-4
        expected = plan(model, PlanInput(nodes=1, gpus_per_node=2, zero_stage=stage, dtype="fp32"))
        measured = res[f"zero{stage}_bytes"]
        for kind in ("params", "grads", "optimizer"):
            want = getattr(expected, kind)
            assert abs(measured[kind] - want) <= 0.1 * want, (stage, kind, measured[kind], want)
