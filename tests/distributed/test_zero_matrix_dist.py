"""The real trainer on every model family under every ZeRO stage (and DeepSeek-V3 with expert
parallelism) on 2 CPU ranks, against the same model in one process with ZeRO-0 in fp32: the loss of
every step within 1e-5 relative, router biases identical on every rank and equal to the reference's.
Also the split LM head under ZeRO-3, and for ZeRO-3 × EP (experts held outside the engine): the joint
gradient norm that clipping uses, resume from a mid-run checkpoint, consolidation, and the per-rank
bytes that `deepsuite plan` predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_spawn import torchrun

from deepsuite.checkpoint.consolidate import consolidated_state_dict
from deepsuite.config.schema import ModelConfig
from deepsuite.parallel.plan import PlanInput, plan

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODELS = ("gpt_tied", "gpt_untied", "dsv3")
# + activation checkpointing and the full-logits loss backend under ZeRO-3, and EP under ZeRO-2
CASES = [f"{m}:z{z}" for m in MODELS for z in (0, 1, 2, 3)] + [
    "dsv3:z3:ckpt",
    "gpt_untied:z3:ckpt:naive",
    "dsv3:z3:naive",
    "dsv3:z1:ep2",
    "dsv3:z2:ep2",
    "dsv3:z3:ep2:resume",
]
STEPS = 10
# 4 ranks, EP 2: expert-data-parallel groups {0, 2}, {1, 3} of size 2 beside the data-parallel
# group of 4, and ranks 2 and 3 hold only padding windows in the evaluation (2 windows, 4 ranks)
EP4_CASES = ["dsv3:z1:ep2", "dsv3:z2:ep2", "dsv3:z3:ep2:resume:bytes"]
GRAD_CLIP = 1.0  # the worker's training.grad_clip


def _run(tmp_path: Path, name: str, cases: list[str], nproc: int) -> dict:
    return torchrun(
        "zero_matrix.py", "--steps", str(STEPS), "--dir", str(tmp_path / name), "--cases", ",".join(cases),
        nproc=nproc, out_json=tmp_path / f"{name}.json", timeout=1200,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every model on 1 rank with ZeRO-0 in fp32 (one launch for both tests): (folder, results)."""
    root = tmp_path_factory.mktemp("matrix")
    return root / "ref", _run(root, "ref", [f"{m}:z0" for m in MODELS], nproc=1)


def test_every_model_under_every_zero_stage_matches_one_process(
    tmp_path: Path, reference: tuple[Path, dict]
) -> None:
    ref_dir, ref = reference
    got = _run(tmp_path, "w2", CASES, nproc=2)
    for case in CASES:
        want = ref[case.split(":")[0] + ":z0"]
        losses = got[case]["losses"]
        assert len(losses) == STEPS, case
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, want["losses"]))
        assert rel < 1e-5, (case, rel, losses, want["losses"])
        assert losses[-1] < losses[0], case  # it trained
        assert got[case]["biases_identical_on_ranks"], case
        assert got[case]["biases"] == want["biases"], case
        assert got[case]["moved_biases"] == case.startswith("dsv3"), case
    # every stage's final checkpoint consolidates to the reference's weights (10 fp32 Adam steps on
    # another reduction order: rarely seen embedding rows move apart by a few 1e-5)
    for case in CASES:
        want = consolidated_state_dict(ref_dir / (case.split(":")[0] + "_z0") / "ckpt")
        got_weights = consolidated_state_dict(tmp_path / "w2" / case.replace(":", "_") / "ckpt")
        assert set(got_weights) == set(want), (case, sorted(set(got_weights) ^ set(want)))
        for key, value in want.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(got_weights[key], value, rtol=0, atol=5e-5, msg=f"{case}: {key}")
    # the end-of-run MTP report (speculative decoding, collective under ZeRO-3), on in this case only
    assert [c for c in CASES if got[c]["mtp_acceptance"] is not None] == ["dsv3:z3"]
    assert 0.0 <= got["dsv3:z3"]["mtp_acceptance"] <= 1.0
    _check_zero3_ep(tmp_path / "w2", got, "dsv3:z3:ep2:resume", dense_norms=got["dsv3:z3"])
    _check_consolidated(tmp_path / "w2", "dsv3:z3:ep2:resume", ref_dir / "dsv3_z0" / "ckpt")


def _check_zero3_ep(run_dir: Path, got: dict, case: str, dense_norms: dict) -> None:
    """ZeRO-3 × EP: the gradient norm (of dense partitions and held experts together) equals (1e-5; fp32 sums in another order) the one
    DeepSpeed computes for the same model without held experts, clipping was active, and the run
    resumed from its step-5 checkpoint repeats steps 6-10 and ends with the same router biases."""
    norms, want = got[case]["grad_norms"], dense_norms["grad_norms"]
    assert len(norms) == STEPS, case
    assert max(abs(a - b) / b for a, b in zip(norms, want)) < 1e-5, (case, norms, want)
    assert max(norms) > GRAD_CLIP, (case, norms)  # clipped by the joint norm
    resumed = got[case]["resumed"]
    assert resumed["start_step"] == 5, case
    rel = max(abs(a - b) / abs(b) for a, b in zip(resumed["losses"], got[case]["losses"][5:]))
    assert len(resumed["losses"]) == STEPS - 5 and rel < 1e-7, (case, rel)
    assert resumed["biases_identical_on_ranks"] and resumed["biases"] == got[case]["biases"], case


def _check_consolidated(run_dir: Path, case: str, reference: Path) -> None:
    """`deepsuite consolidate`'s weights of the ZeRO-3 × EP run (dense from ZeRO's partitions, experts
    from the shard files) and of its resumed run equal the one-process reference's within 1e-5."""
    want = consolidated_state_dict(reference)
    for ckpt in ("ckpt", "ckpt_resumed"):
        got = consolidated_state_dict(run_dir / case.replace(":", "_") / ckpt)
        assert set(got) == set(want), (ckpt, sorted(set(got) ^ set(want)))
        for key, value in want.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{ckpt}: {key}")


def test_split_lm_head_under_zero3(tmp_path: Path) -> None:
    res = torchrun("split_head_zero3.py", "--steps", "6", out_json=tmp_path / "r.json", timeout=600)
    assert res["max_rel"] < 1e-5, res
    assert res["weights_max_abs"] < 1e-5, res
    assert res["losses"][-1] < res["losses"][0]


def test_deepseek_v3_expert_parallel_on_four_ranks_matches_one_process(
    tmp_path: Path, reference: tuple[Path, dict]
) -> None:
    ref_dir, ref = reference[0], reference[1]["dsv3:z0"]
    got = _run(tmp_path, "w4", EP4_CASES, nproc=4)
    for case in EP4_CASES:
        losses = got[case]["losses"]
        assert len(losses) == STEPS, case
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"]))
        assert rel < 1e-5, (case, rel, losses, ref["losses"])
        assert losses[-1] < losses[0], case
        assert got[case]["biases_identical_on_ranks"], case
        assert got[case]["moved_biases"], case
        assert got[case]["biases"] == ref["biases"], case
    case = "dsv3:z3:ep2:resume:bytes"
    _check_zero3_ep(tmp_path / "w4", got, case, dense_norms=got["dsv3:z2:ep2"])
    _check_consolidated(tmp_path / "w4", case, ref_dir / "dsv3_z0" / "ckpt")
    # `deepsuite plan`'s per-rank bytes vs the tensors each of the 4 ranks holds (EP 2 × EDP 2)
    model = ModelConfig(name="deepseek_v3", flavor="deepseek-v3-debug", args={"n_layers": 2, "d_model": 64})
    expected = plan(model, PlanInput(nodes=1, gpus_per_node=4, zero_stage=3, ep_size=2, dtype="fp32"))
    for measured in got[case]["bytes_per_rank"]:
        for kind in ("params", "grads", "optimizer"):
            want = getattr(expected, kind)
            assert abs(measured[kind] - want) <= 0.1 * want, (kind, measured[kind], want)
