"""Expert-parallel building blocks that need no second process: rank layout, validation, sharding,
DeepSpeed tagging and optimizer groups, and the dispatcher on a world of one (gloo)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from deepsuite.config.errors import ConfigError
from deepsuite.layers.moe import DeepSeekMoE
from deepsuite.parallel.expert_parallel import (
    AllToAllDispatcher,
    expert_parallel_modules,
    shard_stacked_experts,
)
from deepsuite.parallel.groups import (
    ExpertLayout,
    ParallelGroups,
    expert_group_name,
    is_expert_param,
    mark_expert_params,
    optimizer_param_groups,
    validate_parallel_layout,
)


def test_layout_matches_deepspeed_e_plus_d_order() -> None:
    # world 8, ep 4: EP groups [0..3] [4..7]; EDP groups [0,4] [1,5] [2,6] [3,7]
    layout = ExpertLayout(world_size=8, ep_size=4, rank=6)
    assert layout.ep_rank == 2 and layout.edp_rank == 1
    assert layout.ep_ranks() == [4, 5, 6, 7]
    assert layout.edp_ranks() == [2, 6]
    assert layout.local_expert_range(256) == (128, 192)
    assert layout.edp_size == 2 and layout.dp_size == 8


@pytest.mark.parametrize(
    ("world", "stage", "ep", "experts", "message"),
    [
        (8, 2, 3, 8, "does not divide the world size 8"),
        (8, 2, 4, 6, "does not divide model.n_routed_experts=6"),
        (8, 0, 2, 8, "zero_stage=0 with parallel.ep_size=2"),
        (8, 2, 0, 8, "must be >= 1"),
        (8, 2, 2, 0, "needs a model with routed experts"),
    ],
)
def test_bad_layouts_name_the_key_and_the_fix(
    world: int, stage: int, ep: int, experts: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_parallel_layout(world, stage, ep, experts)


@pytest.mark.parametrize(("stage", "ep"), [(1, 2), (2, 8), (3, 1), (3, 2), (0, 1)])
def test_supported_layouts(stage: int, ep: int) -> None:
    validate_parallel_layout(8, stage, ep, 256)


def _moe() -> DeepSeekMoE:
    torch.manual_seed(0)
    moe = DeepSeekMoE(16, 8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=12)
    moe.init_weights()
    return moe


def test_shard_keeps_names_and_slices_rows() -> None:
    moe = _moe()
    full = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    assert shard_stacked_experts(moe.experts, ep_rank=3, ep_size=4) == 2
    for name, p in moe.experts.named_parameters():
        torch.testing.assert_close(p, full[name][6:8], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible"):
        shard_stacked_experts(_moe().experts, ep_rank=0, ep_size=3)


def test_tagging_and_optimizer_groups() -> None:
    moe = _moe()
    assert mark_expert_params(moe.experts, expert_group_name(2)) == 2
    assert all(is_expert_param(p) for p in moe.experts.parameters())
    assert not any(is_expert_param(p) for p in moe.gate.parameters())
    named = [{"params": list(moe.parameters()), "name": "decay", "weight_decay": 0.1}]
    groups = optimizer_param_groups(named)
    moe_groups = [g for g in groups if g.get("moe")]
    assert len(moe_groups) == 1 and moe_groups[0]["name"] == "ep_size_2"
    assert moe_groups[0]["weight_decay"] == 0.1  # hyper-parameters carried over
    assert {id(p) for p in moe_groups[0]["params"]} == {id(p) for p in moe.experts.parameters()}
    assert not any(is_expert_param(p) for g in groups if not g.get("moe") for p in g["params"])
    # no expert parameters: groups are returned untouched
    plain = [{"params": list(_moe().parameters()), "name": "x"}]
    assert optimizer_param_groups(plain) is plain


def test_expert_parallel_finds_moe_layers_of_deepseek_v3() -> None:
    from deepsuite.models.registry import build_model

    model = build_model(name="deepseek_v3", flavor="deepseek-v3-debug", device="meta")
    names = [n for n, _ in expert_parallel_modules(model)]
    assert names and all(n.endswith(".ffn") for n in names)
    assert len(names) == model.args.n_moe_layers + model.args.mtp_depth


@pytest.fixture
def world_of_one():
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_all_to_all_dispatcher_on_one_rank_equals_the_single_device_dispatcher(world_of_one) -> None:
    # ep_size=1 through the all-to-all code path (a group of one): the same outputs and gradients
    ref = _moe().train()
    mine = copy.deepcopy(ref)
    groups = ParallelGroups(layout=ExpertLayout(world_size=1, ep_size=1), ep_group=None, edp_group=None)
    mine.dispatcher = AllToAllDispatcher(8, groups)
    x = torch.randn(3, 5, 16)
    xr, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    probe = torch.randn(3, 5, 16)
    (ref(xr) * probe).sum().backward()
    (mine(xm) * probe).sum().backward()
    torch.testing.assert_close(xm.grad, xr.grad)
    for (n, a), b in zip(mine.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    assert any(n.endswith("dispatcher.deepspeed_moe_registration") for n, _ in mine.named_modules())
    assert set(mine.state_dict()) == set(ref.state_dict())  # the registration adds no state


def test_parallelize_experts_refuses_a_model_without_moe_before_any_communication() -> None:
    from deepsuite.models.registry import build_model
    from deepsuite.parallel.expert_parallel import parallelize_experts

    gpt = build_model(name="gpt", flavor="gpt2-debug", device="meta")
    with pytest.raises(ConfigError, match="needs a model with routed experts"):
        parallelize_experts(gpt, world_size=2, zero_stage=2, ep_size=2)
    assert parallelize_experts(gpt, world_size=2, zero_stage=0, ep_size=1) is gpt  # nothing to do


def test_destroy_distributed_drops_deepspeed_expert_groups_first() -> None:
    """The end-of-run teardown empties DeepSpeed's expert-group registries (their gloo groups
    outlived the default group and aborted some exits) and leaves the process group. Run in a
    fresh interpreter: other tests in this process may hold a process group."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import socket
        import torch.distributed as dist
        from deepsuite.parallel.deepspeed import import_deepspeed
        from deepsuite.parallel.dist import destroy_distributed

        import_deepspeed()
        from deepspeed.utils import groups as ds_groups

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        ds_groups._EXPERT_PARALLEL_GROUP["ep_size_1"] = dist.new_group([0])
        ds_groups._EXPERT_DATA_PARALLEL_GROUP["ep_size_1"] = dist.new_group([0])
        destroy_distributed()
        assert not dist.is_initialized()
        assert ds_groups._EXPERT_PARALLEL_GROUP == {} and ds_groups._EXPERT_DATA_PARALLEL_GROUP == {}
        destroy_distributed()  # a second call (atexit after an explicit one) is a no-op
        print("teardown ok")
        """
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "teardown ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
