"""Consolidation returns the optimizer's fp32 master weights, not an upcast low-precision copy.

* ZeRO-0 with ``training.dtype=bf16``: DeepSpeed 0.19 wraps the torch AdamW in its
  ``FP16_UnfusedOptimizer`` and stores the bf16 model under ``module`` and the fp32 masters under
  ``optimizer["fp32_groups"]`` of ``mp_rank_00_model_states.pt``; `consolidated_state_dict`,
  `load_model_from_checkpoint` and ``deepsuite consolidate`` must give the masters bit for bit
  (compared with the live engine's optimizer in the same process); recorded names that do not fit
  the masters are refused, and so is a checkpoint that records none.
* fp32 at ZeRO-0 and bf16 at ZeRO-1/3 stay exact.
* FP8 on Transformer Engine (a fake TE here, tests/fake_te.py): a DeepSeek-V3 run whose experts are
  ``TEGroupedExperts`` (per-expert parameters ``gate_up.weight{e}`` / ``down.weight{e}``, which is
  how the optimizer and DeepSpeed's shard files name them) consolidates to the plain model's
  stacked layout, bit for bit the live masters, at ZeRO-0, 1 and 3; the inspector sees the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DEEPSEEK, tiny_overrides

from deepsuite.checkpoint.consolidate import consolidated_state_dict, load_model_from_checkpoint
from deepsuite.checkpoint.hf_io import read_safetensors
from deepsuite.checkpoint.manager import STATE_FILE, CheckpointError, read_state
from deepsuite.cli import main
from deepsuite.config import load_config
from deepsuite.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_te import install_fake_te

STEPS = 3


@pytest.fixture(autouse=True)
def _torch_linear_restored() -> Any:
    """These tests keep live ZeRO-3 trainers (no `train()` teardown): give later tests torch's
    own ``F.linear`` back, as `train()` does."""
    yield
    from deepsuite.parallel.dist import restore_torch_linear

    restore_torch_linear()


def train_and_save(data: Path, run_dir: Path, **extra: object) -> tuple[Trainer, Path]:
    """A tiny GPT trained `STEPS` optimizer steps and checkpointed, with its live trainer."""
    overrides = dict(training__steps=STEPS, training__eval_every=100, training__sample_tokens=0)
    trainer = Trainer(load_config(None, tiny_overrides(data, run_dir, **overrides, **extra)))
    for _ in range(STEPS):
        trainer.train_step()
    return trainer, trainer.save()


def live_masters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """{parameter name: the live engine's fp32 master of that parameter} (every name of a tied one)."""
    engine = trainer.engine
    stage = trainer.cfg.parallel.zero_stage
    out: dict[str, torch.Tensor] = {}
    if stage == 0:
        opt = engine.optimizer
        master_of = {
            id(lp): hp.detach().clone()
            for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
            for lp, hp in zip(lps, hps)
        }
        for name, p in engine.module.named_parameters(remove_duplicate=False):
            out[name] = master_of[id(p)]
        return out
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in engine.module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(p)
        assert full is not None, name
        out[name] = full.detach().cpu().clone()
    return out


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], value), f"{name}: max diff {(got[name] - value).abs().max()}"


@pytest.fixture(scope="module")
def bf16_zero0(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bf16 ZeRO-0 run: its checkpoint, the live fp32 masters and the live bf16 parameters."""
    run_dir = tmp_path_factory.mktemp("bf16_zero0")
    trainer, path = train_and_save(
        tiny_data, run_dir, training__dtype="bf16", parallel__zero_stage=0, checkpoint__every=STEPS
    )
    assert type(trainer.engine.optimizer).__name__ == "FP16_UnfusedOptimizer"  # what DeepSpeed 0.19 picks
    bf16 = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters(remove_duplicate=False)}
    assert {p.dtype for p in bf16.values()} == {torch.bfloat16}
    return {"run": run_dir, "path": path, "masters": live_masters(trainer), "bf16": bf16}


def test_bf16_zero0_consolidates_to_the_fp32_masters(bf16_zero0: dict[str, Any], tmp_path: Path) -> None:
    path, masters, bf16 = bf16_zero0["path"], bf16_zero0["masters"], bf16_zero0["bf16"]
    state = read_state(path)
    # the masters are not the bf16 copy: an upcast of the module would fail below
    differ = [n for n in masters if not torch.equal(masters[n], bf16[n].float())]
    assert len(differ) >= len(masters) // 2, differ
    sd = consolidated_state_dict(path, state)
    assert_equal(sd, masters)
    assert state["optimizer_param_names"]  # recorded at save time, per optimizer group
    assert sd["lm_head.weight"] is sd["wte.weight"]  # tied: one master under both names
    # generate / convert: the loaded model
    model, _, _ = load_model_from_checkpoint(bf16_zero0["run"])
    assert_equal(dict(model.named_parameters(remove_duplicate=False)), masters)
    # `deepsuite consolidate`
    assert main(["consolidate", str(bf16_zero0["run"]), str(tmp_path / "out"), "--format", "deepsuite"]) == 0
    assert_equal(read_safetensors(tmp_path / "out"), masters)  # tied lm_head.weight: restored alias


def test_bf16_zero0_without_recorded_names_and_with_wrong_ones(bf16_zero0: dict[str, Any]) -> None:
    """Without `optimizer_param_names` the masters cannot be named: refused, as are names that do
    not fit (checked value by value)."""
    path = bf16_zero0["path"]
    state = read_state(path)
    names = state.pop("optimizer_param_names")
    with pytest.raises(CheckpointError, match="named only by the `optimizer_param_names`"):
        consolidated_state_dict(path, state)
    # two same-shaped parameters swapped: their masters do not round to the stored bf16 weights
    flat = [n for group in names for n in group]
    i, j = flat.index("layers.0.ln_1.weight"), flat.index("layers.0.ln_2.weight")
    flat[i], flat[j] = flat[j], flat[i]
    sizes = [len(g) for g in names]
    swapped = [flat[sum(sizes[:k]) : sum(sizes[: k + 1])] for k in range(len(sizes))]
    with pytest.raises(CheckpointError, match="does not round to the stored bfloat16 copy"):
        consolidated_state_dict(path, {**state, "optimizer_param_names": swapped})
    # the file on disk still gives the masters (state.json was not touched by this test)
    assert json.loads((path / STATE_FILE).read_text())["optimizer_param_names"] == names


def test_fp32_zero0_consolidates_to_the_live_weights(tiny_data: Path, tmp_path: Path) -> None:
    trainer, path = train_and_save(tiny_data, tmp_path, parallel__zero_stage=0, checkpoint__every=STEPS)
    live = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters(remove_duplicate=False)}
    assert {p.dtype for p in live.values()} == {torch.float32}
    assert_equal(consolidated_state_dict(path, read_state(path)), live)


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_zero_1_3_consolidate_to_the_fp32_masters(tiny_data: Path, tmp_path: Path, stage: int) -> None:
    trainer, path = train_and_save(
        tiny_data, tmp_path, training__dtype="bf16", parallel__zero_stage=stage, checkpoint__every=STEPS
    )
    masters = live_masters(trainer)
    assert_equal(consolidated_state_dict(path, read_state(path)), masters)


# ------------------------------------------------------------------------ FP8 on Transformer Engine


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_te_run_consolidates_and_inspects_as_the_plain_model(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: int
) -> None:
    """A bf16 DeepSeek-V3 run converted to (fake) TE: its checkpoint consolidates to exactly the plain
    model's keys, whose values are the live fp32 masters (the TE experts' per-expert masters stacked),
    the inspector reports the plain shapes, and the run resumes from it with the same masters."""
    import deepsuite.fp8 as fp8
    from deepsuite.checkpoint.inspect import _training_tensors
    from deepsuite.fp8.experts import TEGroupedExperts
    from deepsuite.models.registry import build_model

    install_fake_te(monkeypatch)
    monkeypatch.setattr(fp8, "select_backend", lambda cfg, device, blockers=(): ("te", []))
    trainer, path = train_and_save(
        tiny_data,
        tmp_path,
        **TINY_DEEPSEEK,
        fp8__enabled=True,
        training__dtype="bf16",
        parallel__zero_stage=stage,
        checkpoint__every=STEPS,
    )
    experts = trainer.engine.module.layers[1].ffn.experts
    assert isinstance(experts, TEGroupedExperts)
    masters = live_masters(trainer)
    assert "layers.1.ffn.experts.gate_up.weight0" in masters  # what the optimizer knows

    sd = consolidated_state_dict(path, read_state(path))
    plain = build_model(trainer.cfg.model, device="cpu")
    assert sorted(sd) == sorted(plain.state_dict())
    for proj, key in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
        stacked = torch.stack(
            [masters[f"layers.1.ffn.experts.{proj}.weight{e}"] for e in range(experts.n_experts)]
        )
        assert torch.equal(sd[f"layers.1.ffn.experts.{key}"], stacked), key
    assert_equal(
        sd, {k: v for k, v in masters.items() if ".experts.gate_up." not in k and ".experts.down." not in k}
    )
    model, _, _ = load_model_from_checkpoint(path)  # strict load into the plain model

    tensors, _ = _training_tensors(path / "deepspeed")
    key = "layers.1.ffn.experts.gate_up_proj"
    assert tensors[key][0] == tuple(model.state_dict()[key].shape)
    assert not any(".gate_up.weight" in k or k.endswith("_extra_state") for k in tensors)

    resumed = Trainer(trainer.cfg)  # the engine loads the plain layout back into the TE modules
    resumed.load()
    assert resumed.step == STEPS
    assert_equal(live_masters(resumed), masters)
