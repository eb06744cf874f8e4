"""Detection average precision (PASCAL VOC style, all-point interpolation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepsuite.vision.boxes import pairwise_box_iou


def average_precision(
    pred_boxes: Sequence[torch.Tensor],
    pred_scores: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    iou_threshold: float = 0.5,
) -> float:
    """AP of one class over a set of images.

    Detections of all images are ranked by score; each is a true positive when its highest-IoU
    ground-truth box in the same image has IoU ≥ ``iou_threshold`` and was not matched by a
    higher-ranked detection (VOC rule), else a false positive. AP is the area under the
    precision-recall curve after making precision monotonically non-increasing (VOC 2010+).

    Args:
        pred_boxes: per image ``(N_i, 4)`` xyxy detections.
        pred_scores: per image ``(N_i,)`` scores.
        gt_boxes: per image ``(M_i, 4)`` xyxy ground truth.
        iou_threshold: IoU needed for a match.

    Returns:
        AP in [0, 1]; NaN when there is no ground truth at all.
    """
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError("pred_boxes, pred_scores and gt_boxes must have one entry per image")
    num_gt = sum(len(g) for g in gt_boxes)
    if num_gt == 0:
        return float("nan")
    records: list[tuple[float, int, int]] = []  # (score, image, detection index)
    for image, scores in enumerate(pred_scores):
        records += [(float(s), image, i) for i, s in enumerate(scores.tolist())]
    records.sort(key=lambda r: -r[0])

    ious = [
        pairwise_box_iou(p.double(), g.double()) if len(p) and len(g) else None
        for p, g in zip(pred_boxes, gt_boxes)
    ]
    matched = [torch.zeros(len(g), dtype=torch.bool) for g in gt_boxes]
    true_positive = []
    for _, image, det in records:
        iou = ious[image]
        hit = False
        if iou is not None:
            best_iou, best_gt = iou[det].max(dim=0)
            if best_iou >= iou_threshold and not matched[image][best_gt]:
                matched[image][best_gt] = True
                hit = True
        true_positive.append(hit)

    tp = torch.tensor(true_positive, dtype=torch.float64).cumsum(0)
    fp = torch.arange(1, len(true_positive) + 1, dtype=torch.float64) - tp
    recall = torch.cat((torch.zeros(1, dtype=torch.float64), tp / num_gt))
    precision = torch.cat((torch.ones(1, dtype=torch.float64), tp / (tp + fp).clamp(min=1)))
    envelope = precision.flip(0).cummax(0).values.flip(0)
    return float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())
