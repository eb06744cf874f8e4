"""Average precision by hand, and a tiny CenterNet that learns to find squares.

The training test: 32×32 grey images with 1–3 non-overlapping bright squares (side 5–11 px) on
noise; a 3-conv backbone (stride 2) + `CenterNetHead` + `CenterNetLoss`, Adam, 200 steps of 16
fresh images, one CPU thread. On 64 held-out images it reaches AP@0.5 = 1.0 and AP@0.75 = 0.97
(seeds 1–3: AP@0.5 1.0, AP@0.75 0.99–1.0) in about 7 s of CPU time; the test asserts
AP@0.5 ≥ 0.9 and AP@0.75 ≥ 0.7.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsuite.vision import CenterNetHead, CenterNetLoss, average_precision, build_centernet_targets

# ---------------------------------------------------------------- AP metric


def test_average_precision_by_hand():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])]
    perfect = [gt[0].clone()]
    assert average_precision(perfect, [torch.tensor([0.9, 0.8])], gt) == pytest.approx(1.0)
    # ranked TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # → envelope 1 up to recall 1/2 and 2/3 up to 1: AP = 1/2 + 1/3
    dets = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [21.0, 21.0, 30.0, 30.0]])]
    assert average_precision(dets, [torch.tensor([0.9, 0.8, 0.7])], gt) == pytest.approx(1 / 2 + 1 / 3)
    # a duplicate of a matched box is a false positive; a missed box caps recall at 1/2
    dup = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])]
    assert average_precision(dup, [torch.tensor([0.9, 0.8])], gt) == pytest.approx(0.5)
    # IoU 81/100 counts at 0.5 and 0.8, not at 0.9
    shifted = [torch.tensor([[1.0, 1.0, 10.0, 10.0]])]
    one_gt = [gt[0][:1]]
    assert average_precision(shifted, [torch.tensor([1.0])], one_gt, 0.8) == pytest.approx(1.0)
    assert average_precision(shifted, [torch.tensor([1.0])], one_gt, 0.9) == pytest.approx(0.0)
    # detections are matched within their own image only
    two_images = average_precision(
        [torch.zeros(0, 4), gt[0][:1]], [torch.zeros(0), torch.tensor([1.0])], [gt[0][:1], gt[0][1:]]
    )
    assert two_images == pytest.approx(0.0)


# ---------------------------------------------------------------- tiny CenterNet

SIZE, STRIDE, BATCH, STEPS = 32, 2, 16, 200


def make_squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``n`` noisy images ``(n, 1, 32, 32)`` and their square boxes (xyxy, pixel edges)."""
    images = 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    boxes = []
    for i in range(n):
        wanted = int(torch.randint(1, 4, (1,), generator=generator))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(20):
            if len(placed) == wanted:
                break
            side = int(torch.randint(5, 12, (1,), generator=generator))
            x0, y0 = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=generator))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[0] > p[2] or p[0] > box[2] or box[1] > p[3] or p[1] > box[3] for p in placed):
                placed.append(box)
                images[i, 0, y0 : y0 + side, x0 : x0 + side] += 0.5 + 0.5 * float(
                    torch.rand(1, generator=generator)
                )
        boxes.append(torch.tensor(placed, dtype=torch.float32))
    return images, boxes


class TinyCenterNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=STRIDE, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.head = CenterNetHead(32, num_classes=1, head_conv=32)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))


def test_tiny_centernet_learns_squares():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model = TinyCenterNet()
        criterion = CenterNetLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        grid = (SIZE // STRIDE, SIZE // STRIDE)
        first_loss = None
        for _ in range(STEPS):
            images, boxes = make_squares(BATCH, generator)
            labels = [torch.zeros(len(b), dtype=torch.long) for b in boxes]
            targets = build_centernet_targets(boxes, labels, 1, grid, STRIDE, max_objects=4)
            loss, _ = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first_loss = loss.item() if first_loss is None else first_loss

        model.eval()
        images, boxes = make_squares(64, torch.Generator().manual_seed(1))
        with torch.no_grad():
            pred_boxes, scores, _ = CenterNetHead.decode(model(images), k=10, stride=STRIDE)
        ap50 = average_precision(list(pred_boxes), list(scores), boxes, iou_threshold=0.5)
        ap75 = average_precision(list(pred_boxes), list(scores), boxes, iou_threshold=0.75)
    finally:
        torch.set_num_threads(threads)
    print(f"tiny CenterNet: loss {first_loss:.3f} → {loss.item():.3f}, AP@0.5 {ap50:.3f}, AP@0.75 {ap75:.3f}")
    assert loss.item() < 0.2 * first_loss
    assert ap50 >= 0.9
    assert ap75 >= 0.7
