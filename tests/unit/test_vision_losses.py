"""Vision losses against float64 reference formulas written element by element, plus targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepsuite.vision import CenterNetLoss, DIoULoss, FocalLoss, GIoULoss, build_centernet_targets
from deepsuite.vision.boxes import xyxy_to_cxcywh
from deepsuite.vision.targets import draw_gaussian, gaussian_radius

# ---------------------------------------------------------------- references (python floats)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_ref(x: float, t: float, alpha: float, gamma: float) -> float:
    """Lin et al. eq. 5 case by case: −α(1−p)^γ log p for positives, −(1−α)p^γ log(1−p) for negatives."""
    p = sigmoid(x)
    if t == 1:
        return -(alpha if alpha >= 0 else 1) * (1 - p) ** gamma * math.log(p)
    return -((1 - alpha) if alpha >= 0 else 1) * p**gamma * math.log(1 - p)


def box_ref(a, b) -> tuple[float, float, float]:
    """(IoU, GIoU, DIoU) of two valid xyxy boxes from their definitions."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    iou = inter / union
    hull_w = max(a[2], b[2]) - min(a[0], b[0])
    hull_h = max(a[3], b[3]) - min(a[1], b[1])
    hull = hull_w * hull_h
    giou = iou - (hull - union) / hull
    centre_dist_sq = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + (
        (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    ) ** 2
    diou = iou - centre_dist_sq / (hull_w**2 + hull_h**2)
    return iou, giou, diou


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 20
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 10 + 0.5
    return torch.cat((xy, xy + wh), dim=-1)


# ---------------------------------------------------------------- focal


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.0), (-1.0, 1.5), (0.9, 3.0)])
def test_focal_loss_matches_case_by_case_reference(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(5, 7, generator=g) > 0.7).double()
    loss = FocalLoss(alpha, gamma, reduction="none")(logits, targets)
    expected = torch.tensor(
        [
            [focal_ref(x, t, alpha, gamma) for x, t in zip(row_x, row_t)]
            for row_x, row_t in zip(logits.tolist(), targets.tolist())
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(FocalLoss(alpha, gamma, "sum")(logits, targets), expected.sum())
    torch.testing.assert_close(FocalLoss(alpha, gamma, "mean")(logits, targets), expected.mean())


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_saturated_logits_have_finite_gradients(gamma):
    """Confident, correct logits: (1 - p_t) is exactly 0 in float32, where x**γ has an infinite
    derivative for γ < 1; the gradient must be (close to) zero, not NaN."""
    logits = torch.tensor([30.0, -30.0, 2.0], requires_grad=True)
    loss = FocalLoss(gamma=gamma, reduction="sum")(logits, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[:2].abs().max() < 1e-6 and logits.grad[2] != 0


def test_focal_loss_gamma_zero_is_bce_with_soft_targets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    soft = torch.rand(4, 3, generator=g, dtype=torch.float64)
    expected = F.binary_cross_entropy(torch.sigmoid(logits), soft)
    torch.testing.assert_close(FocalLoss(alpha=-1, gamma=0.0)(logits, soft), expected)


def test_focal_loss_class_indices_equal_one_hot_and_negative_is_background():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=g)
    classes = torch.tensor([0, 3, 1, -1, 2, 2])
    one_hot = torch.zeros(6, 4)
    for i, c in enumerate(classes.tolist()):
        if c >= 0:
            one_hot[i, c] = 1
    loss = FocalLoss(reduction="none")
    torch.testing.assert_close(loss(logits, classes), loss(logits, one_hot))


def test_focal_loss_gradients_finite_at_extreme_logits():
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0] * 2, requires_grad=True)
    targets = torch.tensor([0.0] * 5 + [1.0] * 5)
    loss = FocalLoss()(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        FocalLoss()(torch.zeros(3, 2), torch.zeros(3, 3))


# ---------------------------------------------------------------- GIoU / DIoU


def test_box_losses_on_known_boxes():
    giou, diou = GIoULoss(reduction="none"), DIoULoss(reduction="none")
    same = torch.tensor([[1.0, 2.0, 5.0, 7.0]])
    assert giou(same, same).item() == pytest.approx(0.0, abs=1e-6)
    assert diou(same, same).item() == pytest.approx(0.0, abs=1e-6)
    # disjoint unit squares two apart: IoU 0, hull 3, union 2 → GIoU −1/3; ρ² = 4, c² = 10
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert giou(a, b).item() == pytest.approx(4 / 3, abs=1e-6)
    assert giou(a, b).item() > 1
    assert diou(a, b).item() == pytest.approx(1.4, abs=1e-6)
    # half overlap: IoU 1/3, hull = union → GIoU 1/3; ρ² = 1, c² = 13
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert giou(a, b).item() == pytest.approx(2 / 3, abs=1e-6)
    assert diou(a, b).item() == pytest.approx(2 / 3 + 1 / 13, abs=1e-6)


@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
def test_box_losses_match_reference_on_random_boxes(box_format):
    g = torch.Generator().manual_seed(3)
    pred, target = random_boxes(64, g), random_boxes(64, g)
    ref = [box_ref(a, b) for a, b in zip(pred.tolist(), target.tolist())]
    giou_ref = torch.tensor([1 - r[1] for r in ref], dtype=torch.float64)
    diou_ref = torch.tensor([1 - r[2] for r in ref], dtype=torch.float64)
    assert (giou_ref > 1).any() and (giou_ref < 1).any()  # the sample has disjoint and overlapping pairs
    if box_format == "cxcywh":
        pred, target = xyxy_to_cxcywh(pred), xyxy_to_cxcywh(target)
    giou = GIoULoss(box_format, reduction="none", eps=0.0)(pred, target)
    diou = DIoULoss(box_format, reduction="none", eps=0.0)(pred, target)
    torch.testing.assert_close(giou, giou_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diou, diou_ref, rtol=1e-12, atol=1e-12)
    weight = torch.rand(64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        GIoULoss(box_format, "sum", eps=0.0)(pred, target, weight), (giou_ref * weight).sum()
    )
    torch.testing.assert_close(DIoULoss(box_format, "mean", eps=0.0)(pred, target), diou_ref.mean())


@pytest.mark.parametrize("loss_cls", [GIoULoss, DIoULoss])
def test_box_loss_gradients_match_finite_differences(loss_cls):
    g = torch.Generator().manual_seed(4)
    pred = random_boxes(6, g).requires_grad_()
    target = random_boxes(6, g)
    assert torch.autograd.gradcheck(lambda p: loss_cls(reduction="sum")(p, target), (pred,))


@pytest.mark.parametrize("loss_cls", [GIoULoss, DIoULoss])
@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
def test_box_losses_degenerate_inputs_have_finite_values_and_gradients(loss_cls, box_format):
    pred = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # a point
            [1.0, 1.0, 1.0, 1.0],  # the same point as its target
            [0.0, 0.0, 0.0, 4.0],  # zero width
            [3.0, 3.0, 1.0, 1.0],  # inverted corners
            [0.0, 0.0, 2.0, 2.0],
        ],
        requires_grad=True,
    )
    target = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],
            [1.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 4.0],
            [0.0, 0.0, 2.0, 2.0],
            [5.0, 5.0, 5.0, 5.0],
        ],
        requires_grad=True,
    )
    loss = loss_cls(box_format, reduction="none")(pred, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert ((loss >= 0) & (loss <= 2 + 1e-6)).all()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(target.grad).all()


def test_box_loss_rejects_bad_format_and_shapes():
    with pytest.raises(ValueError, match="box_format"):
        GIoULoss("xywh")
    with pytest.raises(ValueError, match="shape"):
        DIoULoss()(torch.zeros(3, 4), torch.zeros(2, 4))


# ---------------------------------------------------------------- CenterNet


def centernet_ref(outputs, targets, wh_weight=0.1, offset_weight=1.0) -> tuple[float, float, float, float]:
    """Zhou et al.: focal over every pixel normalised by the number of y = 1 pixels; L1 at centres."""
    logits, heat = outputs["heatmap"].double(), targets["heatmap"].double()
    focal_sum, num_pos = 0.0, 0
    for x, y in zip(logits.flatten().tolist(), heat.flatten().tolist()):
        p = sigmoid(x)
        if y == 1:
            focal_sum += (1 - p) ** 2 * math.log(p)
            num_pos += 1
        else:
            focal_sum += (1 - y) ** 4 * p**2 * math.log(1 - p)
    heatmap_loss = -focal_sum / max(num_pos, 1)
    width = heat.shape[-1]
    l1 = {"wh": 0.0, "reg": 0.0}
    count = 0
    for b in range(targets["ind"].shape[0]):
        for m in range(targets["ind"].shape[1]):
            if targets["mask"][b, m] == 0:
                continue
            count += 1
            y, x = divmod(int(targets["ind"][b, m]), width)
            for name in l1:
                for c in range(2):
                    l1[name] += abs(float(outputs[name][b, c, y, x]) - float(targets[name][b, m, c]))
    wh_loss, offset_loss = l1["wh"] / (2 * count), l1["reg"] / (2 * count)
    total = heatmap_loss + wh_weight * wh_loss + offset_weight * offset_loss
    return heatmap_loss, wh_loss, offset_loss, total


def small_targets():
    boxes = [
        torch.tensor([[4.0, 4.0, 40.0, 30.0], [30.0, 36.0, 60.0, 60.0]]),
        torch.tensor([[0.0, 2.0, 21.0, 23.0]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    return build_centernet_targets(
        boxes, labels, num_classes=2, output_size=(16, 16), stride=4, max_objects=4
    )


def test_centernet_loss_matches_reference():
    targets = small_targets()
    g = torch.Generator().manual_seed(5)
    outputs = {
        "heatmap": torch.randn(2, 2, 16, 16, generator=g) * 2,
        "wh": torch.randn(2, 2, 16, 16, generator=g) * 3,
        "reg": torch.rand(2, 2, 16, 16, generator=g),
    }
    # make one prediction confident at a peak so the positive term is exercised at both ends
    outputs["heatmap"][0, 0].view(-1)[targets["ind"][0, 0]] = 6.0
    total, metrics = CenterNetLoss()(outputs, targets)
    heatmap_loss, wh_loss, offset_loss, ref_total = centernet_ref(outputs, targets)
    assert int((targets["heatmap"] == 1).sum()) == 3  # one peak per object
    assert int(((targets["heatmap"] > 0) & (targets["heatmap"] < 1)).sum()) > 20  # Gaussian rings: β matters
    assert metrics["heatmap_loss"].item() == pytest.approx(heatmap_loss, rel=1e-5)
    assert metrics["wh_loss"].item() == pytest.approx(wh_loss, rel=1e-5)
    assert metrics["offset_loss"].item() == pytest.approx(offset_loss, rel=1e-5)
    assert total.item() == pytest.approx(ref_total, rel=1e-5)
    weighted, _ = CenterNetLoss(heatmap_weight=2.0, wh_weight=0.5, offset_weight=3.0)(outputs, targets)
    assert weighted.item() == pytest.approx(2 * heatmap_loss + 0.5 * wh_loss + 3 * offset_loss, rel=1e-5)


def test_centernet_loss_without_objects_and_extreme_logits_is_finite():
    targets = build_centernet_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 1, (4, 4), 4.0)
    logits = torch.tensor([-100.0, 100.0]).repeat(8).reshape(1, 1, 4, 4).requires_grad_()
    outputs = {"heatmap": logits, "wh": torch.zeros(1, 2, 4, 4), "reg": torch.zeros(1, 2, 4, 4)}
    total, metrics = CenterNetLoss()(outputs, targets)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()
    assert metrics["wh_loss"].item() == 0.0
    assert metrics["heatmap_loss"].item() == pytest.approx(8 * 100.0, rel=1e-4)  # 8 negatives at p = 1


# ---------------------------------------------------------------- targets


def gaussian_radius_reference(det_size, min_overlap=0.7):
    """CenterNet's utils/image.py, verbatim in numpy."""
    height, width = det_size
    a1 = 1
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = np.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 + sq1) / 2
    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = np.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 + sq2) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = np.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / 2
    return min(r1, r2, r3)


def test_gaussian_radius_matches_centernet():
    assert gaussian_radius((10, 10)) == pytest.approx((-28 + math.sqrt(1120)) / 2)  # worked by hand: 2.733
    for size in [(1, 1), (3, 17), (10, 10), (40, 25), (128, 7)]:
        for overlap in (0.5, 0.7, 0.9):
            assert gaussian_radius(size, overlap) == pytest.approx(gaussian_radius_reference(size, overlap))


def test_draw_gaussian_values_cropping_and_max_merge():
    heat = torch.zeros(9, 11, dtype=torch.float64)
    draw_gaussian(heat, (5, 4), radius=3)
    sigma = 7 / 6
    for y in range(9):
        for x in range(11):
            d2 = (x - 5) ** 2 + (y - 4) ** 2
            inside = abs(x - 5) <= 3 and abs(y - 4) <= 3
            assert heat[y, x].item() == pytest.approx(math.exp(-d2 / (2 * sigma**2)) if inside else 0.0)
    draw_gaussian(heat, (0, 8), radius=2)  # in a corner: cropped, peak 1
    assert heat[8, 0] == 1 and heat[4, 5] == 1
    before = heat.clone()
    draw_gaussian(heat, (6, 4), radius=3, k=0.5)  # a weaker splat never lowers values
    assert (heat >= before).all()


def test_build_centernet_targets_by_hand():
    # stride 4: box (10, 6, 30, 22) → (2.5, 1.5, 7.5, 5.5) on the grid: w 5, h 4, centre (5, 3.5)
    targets = build_centernet_targets(
        [torch.tensor([[10.0, 6.0, 30.0, 22.0]])], [torch.tensor([2])], 3, (8, 10), 4.0, 5
    )
    assert targets["heatmap"].shape == (1, 3, 8, 10)
    assert targets["ind"][0, 0].item() == 3 * 10 + 5
    torch.testing.assert_close(targets["wh"][0, 0], torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(targets["reg"][0, 0], torch.tensor([0.0, 0.5]))
    assert targets["mask"][0].tolist() == [1, 0, 0, 0, 0]
    assert targets["heatmap"][0, 2, 3, 5] == 1 and targets["heatmap"][0, :2].sum() == 0
    radius = int(gaussian_radius((4, 5)))
    assert (targets["heatmap"][0, 2] > 0).sum() == (2 * radius + 1) ** 2
    with pytest.raises(ValueError, match="max_objects"):
        build_centernet_targets([torch.zeros(3, 4)], [torch.zeros(3, dtype=torch.long)], 1, (4, 4), 1.0, 2)
    with pytest.raises(ValueError, match="label"):
        build_centernet_targets([torch.tensor([[0.0, 0, 2, 2]])], [torch.tensor([1])], 1, (4, 4), 1.0)
