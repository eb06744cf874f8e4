"""Which resumes need a layout conversion, and the refusal for ZeRO-3 × expert-parallel layouts."""

from __future__ import annotations

from pathlib import Path

from deepsuite.checkpoint.reshard import expert_parallel_refusal, layout_changed, saved_ep_size
from deepsuite.config.loader import config_from_dict

DSV3 = {"name": "deepseek_v3", "flavor": "deepseek-v3-debug"}
EP2_FILES = {"deepspeed/expert_shard_ep000_of002.pt": 1, "deepspeed/expert_shard_ep001_of002.pt": 1}


def _cfg(stage: int, ep: int = 1):  # type: ignore[no-untyped-def]
    return config_from_dict({"model": DSV3, "parallel": {"zero_stage": stage, "ep_size": ep}})


def test_layout_changed() -> None:
    state = {"world_size": 2, "zero_stage": 2}
    assert not layout_changed(state, _cfg(2), 2)
    assert layout_changed(state, _cfg(2), 4)
    assert layout_changed(state, _cfg(3), 2)
    assert layout_changed({"world_size": 1, "zero_stage": 0}, _cfg(0), 2)
    assert layout_changed(state, _cfg(2, ep=2), 2)  # another ep_size alone
    with_ep = {**state, "files": EP2_FILES}
    assert saved_ep_size(with_ep) == 2 and saved_ep_size(state) == 1
    assert not layout_changed(with_ep, _cfg(2, ep=2), 2)
    assert layout_changed(with_ep, _cfg(2), 2)


def test_only_zero3_expert_parallel_layout_changes_are_refused_in_one_line(tmp_path: Path) -> None:
    state = {"world_size": 2, "zero_stage": 2}
    assert expert_parallel_refusal(tmp_path, state, _cfg(2), 2) is None  # same layout: plain resume
    assert expert_parallel_refusal(tmp_path, state, _cfg(0), 1) is None  # converted
    assert expert_parallel_refusal(tmp_path, state, _cfg(2, ep=2), 4) is None  # converted
    with_ep = {**state, "files": EP2_FILES}
    assert expert_parallel_refusal(tmp_path, with_ep, _cfg(0), 1) is None  # EP on the saved side: converted
    message = expert_parallel_refusal(tmp_path, state, _cfg(3, ep=2), 4)
    assert message is not None and "\n" not in message
    assert "ZeRO-3 and expert parallelism is not supported yet" in message
    assert "checkpoint.init_from" in message
    assert expert_parallel_refusal(tmp_path, {**with_ep, "zero_stage": 3}, _cfg(2), 2) is not None
