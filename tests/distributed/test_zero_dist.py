"""DeepSpeed ZeRO 1/2/3 on 2 CPU ranks vs one process with the same global batch (GPT debug flavor)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_spawn import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero_stages_match_single_process_losses(tmp_path: Path) -> None:
    res = torchrun("zero_gpt.py", "--steps", "20", out_json=tmp_path / "r.json", timeout=600)
    assert len(res["ref"]) == 20
    for stage in (1, 2, 3):
        losses = res[f"zero{stage}"]
        assert len(losses) == 20
        assert res[f"zero{stage}_max_rel"] < 1e-5
        assert losses[-1] < losses[0] - 0.1  # it trained
