"""Vision heads: pooling mask, box decoding, CenterNet decode round trip, sub-pixel keypoints."""

from __future__ import annotations

import math

import pytest
import torch

from deepsuite.vision import (
    BoxHead,
    CenterNetHead,
    ClassificationHead,
    HeatmapHead,
    ImageClassificationHead,
    build_centernet_targets,
)
from deepsuite.vision.heads import anchor_points, ltrb_to_xyxy, xyxy_to_ltrb

# ---------------------------------------------------------------- classification


def test_classification_head_pooling_mask_selects_tokens():
    torch.manual_seed(0)
    head = ClassificationHead(hidden_size=8, num_labels=3, dropout=0.5).eval()
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    logits = head(hidden, pooling_mask=mask)
    selected = torch.stack((hidden[0, 0], hidden[0, 3], hidden[1, 2]))  # row-major order of the mask
    expected = selected @ head.score.weight.T + head.score.bias
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, expected)
    assert head(hidden).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="pooling_mask"):
        head(hidden, pooling_mask=mask[:, :4])


def test_classification_head_fp32_logits_dropout_and_reset():
    torch.manual_seed(1)
    head = ClassificationHead(8, 4, dropout=0.5).to(torch.bfloat16)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    assert head.eval()(hidden).dtype == torch.float32
    head.train()
    assert not torch.equal(head(hidden), head(hidden))  # dropout active in training
    before = head.score.weight.clone()
    head.reset_parameters()
    assert not torch.equal(before, head.score.weight)


def test_image_classification_head_is_linear_of_global_average():
    torch.manual_seed(2)
    head = ImageClassificationHead(in_channels=6, num_classes=5).eval()
    features = torch.randn(2, 6, 4, 7)
    expected = features.mean(dim=(2, 3)) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(features), expected)
    with pytest.raises(ValueError, match="B, C, H, W"):
        head(torch.randn(2, 6))


# ---------------------------------------------------------------- boxes


def test_ltrb_round_trip_and_anchor_points():
    points = anchor_points(2, 3, stride=8)
    torch.testing.assert_close(points[:4], torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [4.0, 12.0]]))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 5.0, 30.0, 21.0]]).repeat(3, 1)
    torch.testing.assert_close(ltrb_to_xyxy(xyxy_to_ltrb(boxes, points), points), boxes)
    torch.testing.assert_close(xyxy_to_ltrb(boxes[:1], points[:1]), torch.tensor([[4.0, 4.0, 6.0, 6.0]]))


def test_box_head_decodes_both_formats():
    torch.manual_seed(3)
    for box_format in ("ltrb", "cxcywh"):
        head = BoxHead(in_channels=4, box_format=box_format, head_conv=8)
        pred = head(torch.randn(2, 4, 3, 5))
        assert pred.shape == (2, 4, 3, 5)
        if box_format == "ltrb":
            assert (pred >= 0).all()
        else:
            assert (pred[:, 2:] >= 0).all()
        boxes = head.decode(pred, stride=4)  # (B, HW, 4)
        assert boxes.shape == (2, 15, 4)
        # cell (row 1, col 2) has anchor (10, 6) in input pixels
        p = pred[1, :, 1, 2] * 4
        if box_format == "ltrb":
            expected = torch.stack((10 - p[0], 6 - p[1], 10 + p[2], 6 + p[3]))
        else:
            cx, cy = 10 + p[0], 6 + p[1]
            expected = torch.stack((cx - p[2] / 2, cy - p[3] / 2, cx + p[2] / 2, cy + p[3] / 2))
        torch.testing.assert_close(boxes[1, 1 * 5 + 2], expected)


def test_box_head_vectors_need_points():
    head = BoxHead(6, head_conv=0)
    pred = head(torch.randn(4, 6))
    assert pred.shape == (4, 4)
    points = torch.rand(4, 2) * 10
    torch.testing.assert_close(head.decode(pred, 2.0, points), ltrb_to_xyxy(pred * 2, points))
    with pytest.raises(ValueError, match="anchor points"):
        head.decode(pred, 2.0)
    with pytest.raises(ValueError, match="box_format"):
        BoxHead(6, box_format="xyxy")


# ---------------------------------------------------------------- CenterNet


def test_centernet_head_shapes_and_prior_bias():
    head = CenterNetHead(in_channels=16, num_classes=3, head_conv=8)
    out = head(torch.randn(2, 16, 6, 7))
    assert out["heatmap"].shape == (2, 3, 6, 7)
    assert out["wh"].shape == out["reg"].shape == (2, 2, 6, 7)
    torch.testing.assert_close(head.heatmap[-1].bias, torch.full((3,), -2.19))
    assert torch.sigmoid(torch.tensor(-2.19)).item() == pytest.approx(0.1, abs=1e-3)
    assert CenterNetHead(16, 2, head_conv=0).heatmap[-1].bias.tolist() == pytest.approx([-2.19] * 2)


def synthetic_outputs(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head outputs that are the targets: the Gaussian heatmap, wh and reg written at each centre."""
    b, _, h, w = targets["heatmap"].shape
    maps = {name: torch.zeros(b, 2, h * w) for name in ("wh", "reg")}
    for i in range(b):
        for m in range(targets["ind"].shape[1]):
            if targets["mask"][i, m]:
                for name in maps:
                    maps[name][i, :, targets["ind"][i, m]] = targets[name][i, m]
    return {"heatmap": targets["heatmap"], **{name: v.reshape(b, 2, h, w) for name, v in maps.items()}}


def random_scene(
    generator: torch.Generator, n: int, stride: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` boxes with distinct centre cells (per class) inside a ``size`` image."""
    boxes, labels, cells = [], [], set()
    while len(boxes) < n:
        w, h = (torch.rand(2, generator=generator) * 20 + 4).tolist()
        x1 = float(torch.rand(1, generator=generator)) * (size - w)
        y1 = float(torch.rand(1, generator=generator)) * (size - h)
        cls = int(torch.randint(0, 2, (1,), generator=generator))
        cell = (cls, int((x1 + w / 2) / stride), int((y1 + h / 2) / stride))
        if cell not in cells:
            cells.add(cell)
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(cls)
    return torch.tensor(boxes), torch.tensor(labels)


@pytest.mark.parametrize("as_logits", [False, True])
def test_centernet_decode_recovers_target_boxes_exactly(as_logits):
    g = torch.Generator().manual_seed(4)
    stride, size = 4, 64
    scenes = [random_scene(g, n, stride, size) for n in (1, 4, 7)]
    boxes = [s[0] for s in scenes]
    labels = [s[1] for s in scenes]
    targets = build_centernet_targets(
        boxes, labels, 2, (size // stride, size // stride), stride, max_objects=8
    )
    outputs = synthetic_outputs(targets)
    if as_logits:
        outputs["heatmap"] = torch.logit(outputs["heatmap"], eps=1e-6)
    pred_boxes, scores, classes = CenterNetHead.decode(outputs, k=20, stride=stride, apply_sigmoid=as_logits)
    assert pred_boxes.shape == (3, 20, 4) and scores.shape == classes.shape == (3, 20)
    for i in range(3):
        found = scores[i] > 0.99  # the peaks (value 1); everything else is below a Gaussian's first ring
        assert int(found.sum()) == len(boxes[i])
        order_pred = sorted(zip(pred_boxes[i][found].tolist(), classes[i][found].tolist()))
        order_true = sorted(zip(boxes[i].tolist(), labels[i].tolist()))
        torch.testing.assert_close(
            torch.tensor([b for b, _ in order_pred]), torch.tensor([b for b, _ in order_true])
        )
        assert [c for _, c in order_pred] == [c for _, c in order_true]


def test_centernet_decode_suppresses_non_peaks():
    heat = torch.zeros(1, 1, 5, 5)
    heat[0, 0, 2, 2] = 0.9
    heat[0, 0, 2, 3] = 0.8  # neighbour of a higher value: not a peak
    heat[0, 0, 0, 0] = 0.3
    outputs = {"heatmap": heat, "wh": torch.ones(1, 2, 5, 5), "reg": torch.zeros(1, 2, 5, 5)}
    boxes, scores, _ = CenterNetHead.decode(outputs, k=3, stride=1, apply_sigmoid=False)
    assert scores[0].tolist() == pytest.approx([0.9, 0.3, 0.0])
    torch.testing.assert_close(boxes[0, 0], torch.tensor([1.5, 1.5, 2.5, 2.5]))


# ---------------------------------------------------------------- keypoint heatmaps


def gaussian_map(centres: list[tuple[float, float]], h: int, w: int, sigma: float) -> torch.Tensor:
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    maps = [torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres]
    return torch.stack(maps)[None]  # (1, K, H, W)


def test_heatmap_quadratic_decoding_is_subpixel_exact_for_gaussians():
    centres = [(7.3, 4.8), (2.55, 9.45), (12.0, 3.0), (5.49, 5.51)]
    heat = gaussian_map(centres, 14, 16, sigma=1.5)
    coords, scores = HeatmapHead.decode(heat, stride=4.0)
    torch.testing.assert_close(coords[0], torch.tensor(centres, dtype=torch.float64) * 4, rtol=0, atol=1e-9)
    assert (scores > 0.85).all()
    integer, _ = HeatmapHead.decode(heat, stride=1.0, refine="none")
    assert integer[0].tolist() == [[7.0, 5.0], [3.0, 9.0], [12.0, 3.0], [5.0, 6.0]]


def test_heatmap_soft_argmax_is_the_expectation_and_differentiable():
    centres = [(7.3, 6.8), (8.0, 8.2)]  # ≥ 6σ from the borders: the truncated tails are negligible
    log_heat = gaussian_map(centres, 16, 16, sigma=1.0).log().requires_grad_()
    coords, _ = HeatmapHead.decode(log_heat, refine="soft_argmax", beta=1.0)  # softmax(log g) = g / Σg
    torch.testing.assert_close(
        coords[0].detach(), torch.tensor(centres, dtype=torch.float64), rtol=0, atol=1e-6
    )
    coords.sum().backward()
    assert torch.isfinite(log_heat.grad).all() and log_heat.grad.abs().sum() > 0


def test_heatmap_head_border_peaks_and_logits():
    head = HeatmapHead(in_channels=4, num_keypoints=3, head_conv=8)
    assert head(torch.randn(2, 4, 6, 6)).shape == (2, 3, 6, 6)
    heat = torch.full((1, 1, 5, 5), -10.0)
    heat[0, 0, 0, 4] = 5.0  # a peak in a corner: no neighbour to fit, no refinement
    coords, scores = HeatmapHead.decode(heat, apply_sigmoid=True)
    assert coords[0, 0].tolist() == [4.0, 0.0]
    assert scores[0, 0].item() == pytest.approx(1 / (1 + math.exp(-5.0)))
    with pytest.raises(ValueError, match="refine"):
        HeatmapHead.decode(heat, refine="dark")
