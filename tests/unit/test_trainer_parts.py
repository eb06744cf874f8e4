"""Trainer building blocks: AdamW groups, the LR schedule, router-bias balancing, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepsuite.config import ConfigError, load_config
from deepsuite.models.registry import build_model
from deepsuite.parallel.balancing import update_router_biases
from deepsuite.parallel.dist import ParallelDims
from deepsuite.parallel.parallelize import parallelize_model
from deepsuite.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def tiny_gpt() -> nn.Module:
    return build_model(
        name="gpt", flavor="gpt2-debug", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16
    )


def test_weight_decay_groups() -> None:
    model = tiny_gpt()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.attn.c_attn.weight" in decayed or any(
        "attn" in n and n.endswith("weight") for n in decayed
    )
    assert all(p.ndim == 2 for p in decay["params"])
    assert "wte.weight" in plain and "wpe.weight" in plain  # embeddings (the tied head included)
    assert all(n.endswith("bias") or "ln" in n or n.startswith("w") for n in plain)
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied weight once


def test_schedule_warmup_then_cosine_to_floor() -> None:
    cfg = load_config(None, ["schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1", "training.steps=110"])
    f = lr_factor(cfg.schedule, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 100)))  # the peak once only
    assert f(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(109) == pytest.approx(0.1)  # the last step (training.steps - 1) is at the floor
    assert f(108) > 0.1 and f(500) == pytest.approx(0.1)
    lin = lr_factor(load_config(None, ["schedule.decay=linear", "schedule.warmup_steps=0"]).schedule, 101)
    assert lin(0) == 1.0  # without warmup the first step runs at the peak
    assert lin(50) == pytest.approx(1 - 0.9 * 0.5) and lin(100) == pytest.approx(0.1)
    const = lr_factor(load_config(None, ["schedule.decay=constant", "schedule.warmup_steps=0"]).schedule, 100)
    assert const(99) == 1.0


def test_scheduler_drives_the_optimizer_lr() -> None:
    cfg = load_config(None, ["optim.lr=0.01", "schedule.warmup_steps=4", "training.steps=20"])
    model = tiny_gpt()
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule, 20)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak_then = 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 16)))
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, peak_then])


class FakeMoE(nn.Module):
    """Follows the balancing hooks of DESIGN/COMMON: tokens_per_expert, e_score_correction_bias, update_bias."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("tokens_per_expert", torch.zeros(n), persistent=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(n))

    def update_bias(self, global_load: torch.Tensor, rate: float) -> None:
        self.e_score_correction_bias += rate * torch.sign(global_load.mean() - global_load)
        self.tokens_per_expert.zero_()


def test_router_bias_update_and_stats() -> None:
    model = nn.ModuleDict({"a": FakeMoE(4), "b": FakeMoE(2)})
    model["a"].tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    model["b"].tokens_per_expert.copy_(torch.tensor([3.0, 3.0]))
    stats = update_router_biases(model, 0.01)
    torch.testing.assert_close(model["a"].e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    torch.testing.assert_close(model["b"].e_score_correction_bias, torch.zeros(2))
    assert stats["expert_load/a"] == pytest.approx(2.0) and stats["expert_load/b"] == pytest.approx(1.0)
    assert stats["expert_load/max_over_mean"] == pytest.approx(2.0)
    assert model["a"].tokens_per_expert.sum() == 0
    assert update_router_biases(tiny_gpt(), 0.01) == {}


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    torch.manual_seed(0)
    ref = tiny_gpt()
    ckpt = tiny_gpt()
    ckpt.load_state_dict(ref.state_dict())
    cfg = load_config(None, ["parallel.activation_checkpointing=true"])
    parallelize_model(ckpt, ParallelDims(1, 0, 0), cfg)
    assert list(ckpt.state_dict()) == list(ref.state_dict())
    x = torch.randint(0, 64, (2, 16))
    calls = {"ref": 0, "ckpt": 0}
    for key, m in (("ref", ref), ("ckpt", ckpt)):
        m.layers[0].ln_1.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        m(x, labels=x).loss.backward()
    assert calls == {"ref": 1, "ckpt": 2}  # recomputed in backward
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # generation (no grad, KV cache) still goes through the plain forward
    out = ckpt.generate(x[:, :4], 3, temperature=0.0)
    torch.testing.assert_close(out, ref.generate(x[:, :4], 3, temperature=0.0))


def test_expert_parallel_needs_routed_experts() -> None:
    cfg = load_config(None, [])
    cfg.parallel.ep_size = 2
    cfg.parallel.zero_stage = 2
    with pytest.raises(ConfigError, match="ep_size=2 needs a model with routed experts"):
        parallelize_model(tiny_gpt(), ParallelDims(2, 0, 0, ep_size=2), cfg)


def test_plan_counts_parameters_on_meta(capsys: pytest.CaptureFixture[str]) -> None:
    from deepsuite.cli import main

    assert main(["plan", "--model", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out  # GPT-2 small as published (tied embeddings)
    assert main(["plan", "--model", "gpt2-smal"]) == 2
    assert "did you mean 'gpt2-small'" in capsys.readouterr().err


def test_metrics_logger_mirrors_to_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import sys
    import types

    from deepsuite.training.metrics import MetricsLogger

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}
    run = types.SimpleNamespace(
        log=lambda data, step: calls["log"].append((step, data)), finish=lambda: calls["finish"].append(1)
    )
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, [f"logging.run_dir={tmp_path}", "logging.wandb=true", "logging.wandb_project=p"])
    logger = MetricsLogger(cfg, enabled=True)
    logger.log({"step": 1, "loss": torch.tensor(2.5), "lr": 0.1})
    logger.log({"step": 2, "loss": float("nan")})
    logger.close()
    assert calls["init"][0]["mode"] == "offline" and calls["init"][0]["project"] == "p"
    assert calls["log"][0] == (1, {"loss": 2.5, "lr": 0.1}) and calls["finish"] == [1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 0.1}, {"step": 2, "loss": "nan"}]
    # resuming at step 1 drops records after it
    MetricsLogger(load_config(None, [f"logging.run_dir={tmp_path}"]), enabled=True, resume_step=1)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_restore_torch_linear_undoes_deepspeed_zero3_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed ZeRO-3 swaps ``torch.nn.functional.linear`` for its own process-wide and keeps
    it; `restore_torch_linear` (end of `train()`, teardown) puts torch's back."""
    import sys
    import types

    import torch.nn.functional as F

    from deepsuite.parallel.dist import restore_torch_linear

    original = F.linear
    holder = type("InsertPostInitMethodToModuleSubClasses", (), {"linear_bk": original})
    fake = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    fake.InsertPostInitMethodToModuleSubClasses = holder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.partition_parameters", fake)
    monkeypatch.setattr(F, "linear", lambda *a, **k: None)
    restore_torch_linear()
    assert F.linear is original
