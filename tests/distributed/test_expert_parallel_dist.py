"""Expert parallelism on 2 CPU ranks (gloo) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_spawn import torchrun

pytestmark = pytest.mark.distributed


def test_all_to_all_and_deepseek_moe_ep2_match_one_process(tmp_path: Path) -> None:
    res = torchrun("all_to_all.py", out_json=tmp_path / "r.json")
    assert res["raw_rows_received"] == 3  # rank 0 receives 1 + 2 rows (uneven splits)
    assert res["moe_local_experts"] == 4  # 8 experts over EP=2
    assert res["moe_max_abs_err"] < 1e-5
    assert res["registration_is_deepspeed_moe"] == "MoE"
