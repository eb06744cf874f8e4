"""LM losses and metrics against hand-written float64 computations."""

from __future__ import annotations

import math

import pytest
import torch

from deepsuite.loss import (
    LanguageModelingLoss,
    MultiTokenPredictionLoss,
    PerplexityMetric,
    TokenAccuracyMetric,
    combine_mtp_losses,
)

IGNORE = -100
B, T, V = 2, 6, 11


def manual_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-token ``(1-s)·(-log p_y) + s·mean_c(-log p_c)`` by loops in float64; NaN at ignored."""
    logits, labels = logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    out = torch.full((labels.numel(),), float("nan"), dtype=torch.float64)
    for i, y in enumerate(labels.tolist()):
        if y == IGNORE:
            continue
        row = logits[i]
        lse = math.log(sum(math.exp(v) for v in row.tolist()))
        nll = lse - row[y].item()
        uniform = sum(lse - v for v in row.tolist()) / row.numel()
        out[i] = (1 - smoothing) * nll + smoothing * uniform
    return out


def mean_valid(per_token: torch.Tensor) -> torch.Tensor:
    return per_token[~per_token.isnan()].mean()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 4] = IGNORE
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_language_modeling_loss(batch, smoothing):
    logits, labels = batch
    per_token = manual_ce(logits, labels, smoothing)
    mean = LanguageModelingLoss(V, label_smoothing=smoothing)(logits, labels)
    torch.testing.assert_close(mean, mean_valid(per_token))
    total = LanguageModelingLoss(V, label_smoothing=smoothing, reduction="sum")(logits, labels)
    torch.testing.assert_close(total, per_token.nansum())
    none = LanguageModelingLoss(V, label_smoothing=smoothing, reduction="none")(logits, labels)
    assert none.shape == (B, T)
    torch.testing.assert_close(none.flatten(), per_token.nan_to_num(0.0))


def test_language_modeling_loss_bf16_logits_upcast(batch):
    logits, labels = batch
    loss = LanguageModelingLoss(V)(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss.double(), mean_valid(manual_ce(logits.bfloat16(), labels)), rtol=1e-5, atol=1e-5
    )


def test_language_modeling_loss_checks(batch):
    logits, labels = batch
    with pytest.raises(ValueError, match="vocab_size"):
        LanguageModelingLoss(V + 1)(logits, labels)
    with pytest.raises(ValueError, match="reduction"):
        LanguageModelingLoss(V, reduction="avg")


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_formula(batch, depth):
    logits, labels = batch
    g = torch.Generator().manual_seed(1)
    mtp_logits = [torch.randn(B, T - k, V, generator=g, dtype=torch.float64) for k in range(1, depth + 1)]
    loss_fn = MultiTokenPredictionLoss(V, mtp_depth=depth, mtp_lambda=0.3, label_smoothing=0.1)
    total, parts = loss_fn(logits, mtp_logits, labels)

    main = mean_valid(manual_ce(logits, labels, 0.1))
    # depth k at position i predicts labels[:, i + k]
    mtp = [mean_valid(manual_ce(mtp_logits[k - 1], labels[:, k:], 0.1)) for k in range(1, depth + 1)]
    expected = main + 0.3 * sum(mtp) / depth
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"main_loss", "total_loss"} | {f"mtp_loss_{k}" for k in range(1, depth + 1)}
    torch.testing.assert_close(parts["main_loss"], main)
    for k in range(1, depth + 1):
        torch.testing.assert_close(parts[f"mtp_loss_{k}"], mtp[k - 1])
    torch.testing.assert_close(parts["total_loss"], expected)
    assert not any(v.requires_grad for v in parts.values())


def test_mtp_loss_backprop_and_eval(batch):
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    mtp = torch.randn(B, T - 1, V, dtype=torch.float64, requires_grad=True)
    total, _ = MultiTokenPredictionLoss(V)(logits, [mtp], labels)
    total.backward()
    assert logits.grad is not None and mtp.grad is not None
    # no MTP logits (eval): the main loss alone
    total, parts = MultiTokenPredictionLoss(V)(logits, None, labels)
    torch.testing.assert_close(total, parts["main_loss"])
    assert "mtp_loss_1" not in parts


def test_mtp_loss_checks(batch):
    logits, labels = batch
    with pytest.raises(ValueError, match="expected 2 MTP logits"):
        MultiTokenPredictionLoss(V, mtp_depth=2)(logits, [torch.randn(B, T - 1, V)], labels)
    with pytest.raises(ValueError, match="T - 1"):
        MultiTokenPredictionLoss(V)(logits, [torch.randn(B, T, V)], labels)


def test_combine_mtp_losses():
    main = torch.tensor(2.0, requires_grad=True)
    mtp = [torch.tensor(1.0), torch.tensor(4.0)]
    total, parts = combine_mtp_losses(main, mtp, 0.5)
    torch.testing.assert_close(total, torch.tensor(2.0 + 0.5 * 2.5))
    assert total.requires_grad
    assert parts["mtp_loss_2"] == 4.0 and parts["total_loss"] == 3.25
    total, parts = combine_mtp_losses(main, [], 0.3)
    assert total is main and set(parts) == {"main_loss", "total_loss"}


def test_perplexity_and_accuracy(batch):
    logits, labels = batch
    ppl = PerplexityMetric()(logits, labels)
    torch.testing.assert_close(ppl, mean_valid(manual_ce(logits, labels)).exp())
    acc = TokenAccuracyMetric()(logits, labels)
    valid = [(i, t) for i in range(B) for t in range(T) if labels[i, t] != IGNORE]
    correct = sum(int(logits[i, t].argmax() == labels[i, t]) for i, t in valid)
    assert acc.item() == pytest.approx(correct / len(valid))
    # the metric must not count ignored positions even when their "label" would match
    labels2 = logits.argmax(-1)
    labels2[0, :] = IGNORE
    assert TokenAccuracyMetric()(logits, labels2).item() == 1.0
    labels2[1, 0] = (labels2[1, 0] + 1) % V
    assert TokenAccuracyMetric()(logits, labels2).item() == pytest.approx((T - 1) / T)
