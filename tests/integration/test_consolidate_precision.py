"""Consolidation returns the optimizer's fp32 master weights, not an upcast low-precision copy.

* ZeRO-0 with ``training.dtype=bf16``: DeepSpeed 0.19 wraps the torch AdamW in its
  ``FP16_UnfusedOptimizer`` and stores the bf16 model under ``module`` and the fp32 masters under
  ``optimizer["fp32_groups"]`` of ``mp_rank_00_model_states.pt``; `consolidated_state_dict`,
  `load_model_from_checkpoint` and ``deepsuite consolidate`` must give the masters bit for bit
  (compared with the live engine's optimizer in the same process), also for a checkpoint whose
  state.json predates the recorded group names.
* fp32 at ZeRO-0 and bf16 at ZeRO-1/3 stay exact.
* FP8 on Transformer Engine (no TE here): a state dict with ``TEGroupedExperts`` keys
  (``gate_up.weight{e}`` / ``down.weight{e}``) and ``_extra_state`` entries, built by hand, maps
  back to the plain model's stacked-experts layout, through the helper and through a ZeRO-0
  checkpoint file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DEEPSEEK, tiny_overrides

from deepsuite.checkpoint.hf_io import load_state_dict_strict, read_safetensors
from deepsuite.checkpoint.manager import (
    STATE_FILE,
    CheckpointError,
    consolidated_state_dict,
    load_model_from_checkpoint,
    read_state,
)
from deepsuite.cli import main
from deepsuite.config import load_config
from deepsuite.training.trainer import Trainer

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
    """A checkpoint from before `optimizer_param_names`: the names come from deepsuite's optimizer
    grouping of the config's model, checked value by value; names that do not fit are refused."""
    path = bf16_zero0["path"]
    state = read_state(path)
    names = state.pop("optimizer_param_names")
    assert_equal(consolidated_state_dict(path, state), bf16_zero0["masters"])
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


def te_layout(plain: dict[str, torch.Tensor], extra_state: Any) -> dict[str, Any]:
    """``plain`` as a model converted by `prepare_fp8` on the TE backend would store it: every
    stacked ``experts.gate_up_proj`` / ``experts.down_proj`` as ``TEGroupedExperts``' per-expert
    ``gate_up.weight{e}`` / ``down.weight{e}`` plus ``_extra_state``, every Linear with an
    ``_extra_state`` (te.Linear), in module order."""
    out: dict[str, Any] = {}
    for key, value in plain.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj"):
            proj = leaf.removesuffix("_proj")
            for e in range(value.shape[0]):
                out[f"{prefix}.{proj}.weight{e}"] = value[e].clone()
            out[f"{prefix}.{proj}._extra_state"] = extra_state
        else:
            out[key] = value
            if leaf == "weight" and value.ndim == 2 and "norm" not in prefix and "embed" not in prefix:
                out[f"{prefix}._extra_state"] = extra_state
    return out


def tiny_deepseek() -> torch.nn.Module:
    from deepsuite.config.loader import config_from_dict, config_to_dict
    from deepsuite.models.registry import build_model

    cfg = load_config(None, tiny_overrides(Path("unused"), Path("unused"), **TINY_DEEPSEEK))
    model_cfg = config_from_dict(config_to_dict(cfg)).model
    torch.manual_seed(0)
    return build_model(model_cfg, device="cpu")


def test_te_expert_keys_map_back_to_the_stacked_layout() -> None:
    from deepsuite.fp8.experts import stack_te_expert_state_dict, te_expert_stack_plan

    model = tiny_deepseek()
    plain = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in plain)
    # a non-tensor extra state too (older TE pickled a BytesIO): never touched, only dropped
    for extra in (torch.zeros(0, dtype=torch.uint8), io.BytesIO(b"fp8 meta")):
        te_sd = te_layout(plain, extra)
        assert any(k.endswith("gate_up.weight1") for k in te_sd)
        assert any(k.endswith("_extra_state") for k in te_sd)
        mapped = stack_te_expert_state_dict(te_sd)
        assert list(mapped) == list(plain)
        for key, value in plain.items():
            assert torch.equal(mapped[key], value), key
    plan = te_expert_stack_plan(te_layout(plain, None))
    e = model.layers[1].ffn.experts.n_experts  # type: ignore[union-attr,index]
    expected = [f"layers.1.ffn.experts.down.weight{i}" for i in range(e)]
    assert plan["layers.1.ffn.experts.down_proj"] == expected
    # a lone `down.weight0` (no gate_up, or experts missing) is not an expert pair
    assert te_expert_stack_plan(["a.down.weight0", "b.gate_up.weight0", "b.down.weight1"]) == {}


def test_te_zero0_checkpoint_consolidates_and_inspects_as_the_plain_model(tmp_path: Path) -> None:
    """A ZeRO-0 fp32 model states file with TE keys (tensor `_extra_state`, as TE writes it):
    consolidation gives the plain layout that loads strictly into the plain model, and the
    inspector's shapes are the stacked ones."""
    from deepsuite.checkpoint.inspect import _training_tensors

    model = tiny_deepseek()
    plain = model.state_dict()
    tag_dir = tmp_path / "step_1" / "deepspeed"
    tag_dir.mkdir(parents=True)
    te_sd = te_layout(plain, torch.zeros(8, dtype=torch.uint8))
    torch.save({"module": te_sd, "optimizer": None}, tag_dir / "mp_rank_00_model_states.pt")
    sd = consolidated_state_dict(tmp_path / "step_1", {"zero_stage": 0})
    assert sorted(sd) == sorted(plain)
    fresh = tiny_deepseek()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_state_dict_strict(fresh, sd)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, plain[key]), key
    tensors, _ = _training_tensors(tag_dir)
    key = "layers.1.ffn.experts.gate_up_proj"
    assert tensors[key][0] == tuple(plain[key].shape)
    assert not any(".gate_up.weight" in k for k in tensors)
