"""Which resumes need a layout conversion, and the refusal for expert-parallel layouts."""

from __future__ import annotations

from pathlib import Path

from deepsuite.checkpoint.reshard import expert_parallel_refusal, layout_changed
from deepsuite.config.loader import config_from_dict

DSV3 = {"name": "deepseek_v3", "flavor": "deepseek-v3-debug"}


def _cfg(stage: int, ep: int = 1):  # type: ignore[no-untyped-def]
    return config_from_dict({"model": DSV3, "parallel": {"zero_stage": stage, "ep_size": ep}})


def test_layout_changed() -> None:
    state = {"world_size": 2, "zero_stage": 2}
    assert not layout_changed(state, _cfg(2), 2)
    assert layout_changed(state, _cfg(2), 4)
    assert layout_changed(state, _cfg(3), 2)
    assert layout_changed({"world_size": 1, "zero_stage": 0}, _cfg(0), 2)


def test_expert_parallel_layouts_are_refused_in_one_line(tmp_path: Path) -> None:
    state = {"world_size": 2, "zero_stage": 2}
    assert expert_parallel_refusal(tmp_path, state, _cfg(2), 2) is None  # same layout: plain resume
    assert expert_parallel_refusal(tmp_path, state, _cfg(0), 1) is None  # no EP: converted
    message = expert_parallel_refusal(tmp_path, state, _cfg(2, ep=2), 4)
    assert message is not None and "\n" not in message
    assert "resharding expert-parallel checkpoints is not supported yet" in message
    assert "checkpoint.init_from" in message
    shards = tmp_path / "deepspeed"
    shards.mkdir()
    (shards / "expert_shard_ep0_of2.pt").write_bytes(b"")
    assert expert_parallel_refusal(tmp_path, state, _cfg(0), 1) is not None  # EP on the saved side
