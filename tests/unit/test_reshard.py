"""Which resumes need a layout conversion (world size, ZeRO stage or ep_size changed)."""

from __future__ import annotations

from deepsuite.checkpoint.reshard import layout_changed, saved_ep_size
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
    assert layout_changed(with_ep, _cfg(3, ep=2), 2)  # ZeRO-3 × EP is converted like any other
    assert not layout_changed({**with_ep, "zero_stage": 3}, _cfg(3, ep=2), 2)
