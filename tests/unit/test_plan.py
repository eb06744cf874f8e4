"""`deepsuite plan`: parameter counts, the memory formulas, layout validation and the printed table."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from deepsuite.config.errors import ConfigError
from deepsuite.config.families.deepseek_v3 import count_parameters
from deepsuite.config.schema import ModelConfig
from deepsuite.parallel.plan import (
    GIB,
    PlanInput,
    add_plan_arguments,
    alternatives,
    count_params,
    find_flavor,
    format_smallest,
    plan,
    plan_main,
    smallest_layouts,
)

V3 = ModelConfig(name="deepseek_v3", flavor="deepseek-v3-671b")


@pytest.fixture(scope="module")
def v3_counts():
    return count_params(V3)


def test_671b_counts_match_the_published_sizes(v3_counts) -> None:
    ref = count_parameters(V3.resolved_args)
    assert v3_counts.total == ref["total_with_mtp"]
    assert abs(ref["total"] / 1e9 - 671) < 1.0  # DeepSeek-V3: 671B without the MTP module
    assert v3_counts.n_routed_experts == 256
    assert v3_counts.moe_layers == 58 + 1  # 61 layers − 3 dense, + the MTP block
    assert v3_counts.routed == 59 * 256 * 3 * 7168 * 2048
    # the table's figures: main model without MTP, MTP separately, activated per token
    assert v3_counts.main == ref["total"] and v3_counts.mtp == ref["mtp"]
    assert v3_counts.activated == ref["activated"]


def test_gpt_has_no_experts() -> None:
    counts = count_params(ModelConfig(name="gpt", flavor="gpt2-small"))
    assert counts.routed == 0 and counts.moe_layers == 0
    assert abs(counts.total / 1e6 - 124.4) < 0.5  # GPT-2 small, tied embeddings


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_formulas(stage: int) -> None:
    model = ModelConfig(name="gpt", flavor="gpt2-debug")
    n = count_params(model).total
    p = plan(model, PlanInput(nodes=1, gpus_per_node=4, zero_stage=stage, dtype="bf16"))
    assert p.params == int(n * 2 / (4 if stage == 3 else 1))
    assert p.grads == int(n * 2 / (4 if stage >= 1 else 1))
    assert p.optimizer == int(n * 12 / (4 if stage >= 1 else 1))
    fp32 = plan(model, PlanInput(nodes=1, gpus_per_node=4, zero_stage=stage, dtype="fp32"))
    assert fp32.params == 2 * p.params
    # stage 0 in fp32 steps the parameters themselves: no master copy
    assert fp32.optimizer == int(n * (8 if stage == 0 else 12) / (4 if stage >= 1 else 1))


def test_experts_are_sharded_over_ep_then_edp(v3_counts) -> None:
    base = PlanInput(nodes=4, gpus_per_node=8, zero_stage=2, ep_size=1)
    ep8 = dataclasses.replace(base, ep_size=8)
    p1, p8 = plan(V3, base, v3_counts), plan(V3, ep8, v3_counts)
    # parameters: dense full everywhere; experts 1/ep of the routed total
    assert p1.params == int(v3_counts.total * 2)
    assert p8.params == int(v3_counts.dense * 2 + v3_counts.routed / 8 * 2)
    # optimizer: experts sharded over edp = 32 / 8 = 4 replicas
    assert p8.optimizer == int(v3_counts.dense * 12 / 32 + v3_counts.routed / 8 * 12 / 4)
    assert p1.all_to_all_bytes_per_step == 0 < p8.all_to_all_bytes_per_step


def test_all_to_all_bytes_formula(v3_counts) -> None:
    inp = PlanInput(
        nodes=2, gpus_per_node=8, zero_stage=1, ep_size=16, micro_batch=2, seq_len=1024, grad_accum=3
    )
    want = 59 * 3 * (2 * 1024 * 8 * 7168 * 2) * 15 / 16 * 4
    assert plan(V3, inp, v3_counts).all_to_all_bytes_per_step == int(want)
    ckpt = dataclasses.replace(inp, activation_checkpointing=True)
    assert plan(V3, ckpt, v3_counts).all_to_all_bytes_per_step == int(want * 6 / 4)


def test_activation_checkpointing_reduces_activations(v3_counts) -> None:
    inp = PlanInput(nodes=32, gpus_per_node=8, zero_stage=2, ep_size=64, micro_batch=1, seq_len=4096)
    full = plan(V3, inp, v3_counts).activations
    ckpt = plan(V3, dataclasses.replace(inp, activation_checkpointing=True), v3_counts).activations
    assert ckpt < full / 10


def test_gpt_activation_matches_the_34sbh_rule() -> None:
    model = ModelConfig(name="gpt", flavor="gpt2-small")
    inp = PlanInput(nodes=1, gpus_per_node=1, zero_stage=0, micro_batch=1, seq_len=1024)
    act = plan(model, inp).activations
    # bf16: the 1024 tokens' bf16 logits in one chunk, 667 rows of fp32 scratch (128 MiB cap), the
    # bf16 (V, D) weight-gradient product, the fp32 (tokens, D) hidden-state gradient
    loss_work = 1024 * 50257 * 2 + 667 * 50257 * 4 + 50257 * 768 * 2 + 1024 * 768 * 4
    assert act - loss_work == 34 * 1024 * 768 * 12


@pytest.mark.parametrize(
    ("ep", "stage", "fragment"),
    [(3, 2, "does not divide the world size"), (32, 2, None), (2, 3, None), (2, 0, "zero_stage=0")],
)
def test_layout_validation(v3_counts, ep: int, stage: int, fragment: str | None) -> None:
    inp = PlanInput(nodes=4, gpus_per_node=8, zero_stage=stage, ep_size=ep)
    if fragment is None:
        plan(V3, inp, v3_counts)
        return
    with pytest.raises(ConfigError, match=fragment):
        plan(V3, inp, v3_counts)


def test_ep_must_divide_experts() -> None:
    model = ModelConfig(name="deepseek_v3", flavor="deepseek-v3-debug")  # 8 experts
    with pytest.raises(ConfigError, match="n_routed_experts=8"):
        plan(model, PlanInput(nodes=2, gpus_per_node=8, zero_stage=2, ep_size=16))


def test_671b_on_32_nodes_prints_and_suggests(v3_counts, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    ns = parser.parse_args(
        [
            "--model",
            "deepseek-v3-671b",
            "--nodes",
            "32",
            "--gpus-per-node",
            "8",
            "--gpu-mem",
            "80",
            "--zero",
            "2",
            "--ep",
            "64",
            "--micro-batch",
            "1",
            "--seq-len",
            "4096",
            "--act-ckpt",
        ]
    )
    assert plan_main(ns) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3-671b" in out and "32x8 GPUs, ZeRO-2, EP=64" in out
    assert "671.03B without MTP; MTP modules 11.61B more, 682.64B in memory" in out
    assert "activated per token: 37.55B (36.63B without the embedding lookup)" in out
    assert "DOES NOT FIT" in out and "layouts that would fit" in out
    p = plan(
        V3, PlanInput(nodes=32, gpus_per_node=8, zero_stage=2, ep_size=64, activation_checkpointing=True)
    )
    assert not p.fits
    fixes = alternatives(V3, p)
    assert fixes and all(f.fits and f.total <= 0.95 * 80 * GIB for f in fixes)


def test_find_flavor() -> None:
    assert find_flavor("gpt2-xl").name == "gpt"
    assert find_flavor("deepseek-v3-671b").name == "deepseek_v3"
    assert find_flavor("deepseek_v3:deepseek-v3-debug").flavor == "deepseek-v3-debug"
    assert find_flavor("gpt").name == "gpt"
    with pytest.raises(ConfigError, match="not a known flavor"):
        find_flavor("llama-3")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], r"--nodes=0 must be >= 1"),
        (["--gpus-per-node", "-1"], r"--gpus-per-node=-1 must be >= 1"),
        (["--micro-batch", "0"], r"--micro-batch=0 must be >= 1"),
        (["--seq-len", "0"], r"--seq-len=0 must be >= 1"),
        (["--grad-accum", "0"], r"--grad-accum=0 must be >= 1"),
        (["--ep", "0"], r"--ep=0 must be >= 1"),
        (["--zero", "4"], r"--zero=4 must be a ZeRO stage"),
        (["--gpu-mem", "0"], r"--gpu-mem=0.0 must be a finite number of GiB > 0"),
        (["--gpu-mem", "nan"], r"--gpu-mem=nan must be a finite number"),
    ],
)
def test_plan_refuses_bad_numbers(args: list[str], message: str) -> None:
    """Counts < 1 used to divide by zero (--nodes 0) or print a meaningless FITS (--micro-batch 0)."""
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    with pytest.raises(ConfigError, match=message):
        plan_main(parser.parse_args(["--model", "gpt2-small", *args]))


@pytest.mark.parametrize(
    "field", ["nodes", "gpus_per_node", "micro_batch", "seq_len", "grad_accum", "gpu_mem_gb"]
)
def test_plan_input_refuses_non_positive_values(field: str) -> None:
    gpt = ModelConfig(name="gpt", flavor="gpt2-small")
    with pytest.raises(ConfigError, match=rf"{field}=0 must be"):
        plan(gpt, dataclasses.replace(PlanInput(), **{field: 0}))


def test_grad_accum_comes_from_the_config() -> None:
    """`plan --config`: the config's accumulation (explicit, or global / (micro x planned world))."""
    import argparse

    from deepsuite.config import load_config
    from deepsuite.parallel.plan import _config_grad_accum

    ns = argparse.Namespace(nodes=None, gpus_per_node=2, micro_batch=None)
    tr = load_config(None, ["training.global_batch_size=32", "training.micro_batch_size=4"]).training
    assert _config_grad_accum(tr, ns, None) == 4  # 32 / (4 x 1 node x 2 GPUs)
    tr.gradient_accumulation_steps = 3
    assert _config_grad_accum(tr, ns, None) == 3


def test_zero3_ep_holds_experts_whole_per_ep_rank(v3_counts) -> None:
    """ZeRO-3 × EP: dense sharded over all ranks, experts whole on each EP rank (not over edp)."""
    inp = PlanInput(nodes=32, gpus_per_node=8, zero_stage=3, ep_size=64, dtype="bf16")
    p = plan(V3, inp, v3_counts)
    dense, experts = v3_counts.dense, v3_counts.routed / 64
    assert p.params == int(dense * 2 / 256 + experts * 2)
    assert p.grads == int(dense * 2 / 256 + experts * 4)
    assert p.optimizer == int(dense * 12 / 256 + experts * 12)
    fp32 = plan(V3, dataclasses.replace(inp, dtype="fp32"), v3_counts)
    assert fp32.optimizer == int(dense * 12 / 256 + experts * 8)  # fp32: the parameters are the masters
    # the same experts under ZeRO-2 are partitioned over the 4 expert-data-parallel replicas
    z2 = plan(V3, dataclasses.replace(inp, zero_stage=2), v3_counts)
    assert z2.optimizer == int(dense * 12 / 256 + experts * 12 / 4)


def test_smallest_layout_per_stage_for_671b(v3_counts) -> None:
    base = plan(V3, PlanInput(nodes=32, gpus_per_node=8, zero_stage=3, ep_size=64), v3_counts)
    found = smallest_layouts(V3, base)
    assert found[0] is None  # 682.64B bf16 weights alone exceed a GPU
    for stage in (1, 2, 3):
        p = found[stage]
        assert p is not None and p.fits and p.inputs.zero_stage == stage
        # nothing fits on half as many GPUs with any EP size and checkpointing
        half = p.inputs.nodes // 2
        for ep in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            try:
                smaller = plan(
                    V3,
                    dataclasses.replace(p.inputs, nodes=half, ep_size=ep, activation_checkpointing=True),
                    v3_counts,
                )
            except ConfigError:
                continue
            assert half == 0 or not smaller.fits, (stage, ep)
    z1, z2, z3 = found[1], found[2], found[3]
    assert z1 is not None and z2 is not None and z3 is not None
    assert (z1.inputs.world, z1.inputs.ep_size) == (512, 256)
    assert (z2.inputs.world, z2.inputs.ep_size) == (512, 256)
    assert z3.inputs.world == 256
    text = format_smallest(found, base.inputs)
    assert "ZeRO-0: none up to 512x8 GPUs" in text and "ZeRO-3:   256 GPUs" in text
