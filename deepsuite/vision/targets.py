"""CenterNet training targets: Gaussian radius, Gaussian splats and the per-image target builder.

Follows Zhou et al., "Objects as Points" (2019) and their reference code (``CenterNet/src/lib/utils/
image.py`` and ``datasets/sample/ctdet.py``): a box of size (h, w) on the output grid gets a
Gaussian of radius ``gaussian_radius((ceil(h), ceil(w)), 0.7)`` at its integer centre, splatted
with an element-wise max; size ``wh`` is in output-grid cells, ``reg`` is the sub-cell offset of
the centre and ``ind = y * W + x`` the flat index of the centre cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def gaussian_radius(det_size: tuple[float, float], min_overlap: float = 0.7) -> float:
    """Largest corner shift that keeps IoU ≥ ``min_overlap`` for a box of ``det_size = (h, w)``.

    The three cases of CornerNet/CenterNet, written as in their reference code (including the
    ``/ 2`` in place of ``/ (2a)`` of the quadratic formula that the published models were trained
    with), so radii match theirs.
    """
    height, width = det_size
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_2d(radius: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(2r+1, 2r+1)`` Gaussian ``exp(−(x² + y²)/(2σ²))`` with peak 1 at the centre.

    Values below machine epsilon times the peak are set to 0 (as the reference code).
    """
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(coords[None, :] ** 2 + coords[:, None] ** 2) / (2 * sigma * sigma))
    g[g < torch.finfo(torch.float64).eps * g.max()] = 0
    return g.to(dtype)


def draw_gaussian(
    heatmap: torch.Tensor, center: tuple[int, int], radius: int, k: float = 1.0
) -> torch.Tensor:
    """Splat a Gaussian of ``radius`` (σ = (2r+1)/6) at integer ``center = (x, y)`` into ``heatmap``.

    ``heatmap`` is ``(H, W)`` and updated in place with an element-wise max (overlapping objects keep
    their own peaks); the part outside the map is cropped. Returns ``heatmap``.
    """
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {tuple(heatmap.shape)}")
    radius = int(radius)
    diameter = 2 * radius + 1
    gaussian = gaussian_2d(radius, diameter / 6, heatmap.dtype).to(heatmap.device)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return heatmap  # centre outside the map
    region = heatmap[y - top : y + bottom, x - left : x + right]
    patch = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    torch.maximum(region, patch * k, out=region)
    return heatmap


def build_centernet_targets(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    num_classes: int,
    output_size: tuple[int, int],
    stride: float,
    max_objects: int = 128,
    min_overlap: float = 0.7,
) -> dict[str, torch.Tensor]:
    """Targets for `CenterNetLoss` from per-image boxes.

    Args:
        boxes: one ``(N_i, 4)`` tensor per image, xyxy in input pixels.
        labels: one ``(N_i,)`` integer tensor per image, classes in ``[0, num_classes)``.
        num_classes: heatmap channels.
        output_size: ``(H, W)`` of the head's output grid.
        stride: input pixels per output cell (boxes are divided by it).
        max_objects: slots per image ``M``; more objects is an error.
        min_overlap: IoU used by `gaussian_radius`.

    Returns:
        ``{"heatmap": (B, C, H, W), "wh": (B, M, 2), "reg": (B, M, 2), "ind": (B, M) long,
        "mask": (B, M)}``; ``wh`` in output cells, ``reg`` the centre's offset from its cell,
        ``mask`` 1 for filled slots. Boxes are clipped to the map ``[0, W] × [0, H]`` (the reference
        code clips to ``W − 1``); boxes of zero width or height after clipping are skipped.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got boxes for {len(boxes)} images but labels for {len(labels)}")
    height, width = output_size
    batch = len(boxes)
    heatmap = torch.zeros(batch, num_classes, height, width)
    wh = torch.zeros(batch, max_objects, 2)
    reg = torch.zeros(batch, max_objects, 2)
    ind = torch.zeros(batch, max_objects, dtype=torch.long)
    mask = torch.zeros(batch, max_objects)
    for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        if len(image_boxes) > max_objects:
            raise ValueError(f"image {b} has {len(image_boxes)} boxes > max_objects={max_objects}; raise it")
        for k, (box, cls) in enumerate(zip(image_boxes.double().tolist(), image_labels.tolist())):
            if not 0 <= cls < num_classes:
                raise ValueError(f"image {b}: label {cls} outside [0, num_classes={num_classes})")
            x1, x2 = (min(max(v / stride, 0.0), float(width)) for v in (box[0], box[2]))
            y1, y2 = (min(max(v / stride, 0.0), float(height)) for v in (box[1], box[3]))
            h, w = y2 - y1, x2 - x1
            if h <= 0 or w <= 0:
                continue
            radius = max(0, int(gaussian_radius((math.ceil(h), math.ceil(w)), min_overlap)))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            cx_int, cy_int = min(int(cx), width - 1), min(int(cy), height - 1)
            draw_gaussian(heatmap[b, cls], (cx_int, cy_int), radius)
            wh[b, k] = torch.tensor((w, h))
            reg[b, k] = torch.tensor((cx - cx_int, cy - cy_int))
            ind[b, k] = cy_int * width + cx_int
            mask[b, k] = 1
    return {"heatmap": heatmap, "wh": wh, "reg": reg, "ind": ind, "mask": mask}
