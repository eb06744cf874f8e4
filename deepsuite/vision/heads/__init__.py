"""Vision heads: classification, box regression, CenterNet and keypoint heatmaps."""

from deepsuite.vision.heads.box import BoxHead, anchor_points, ltrb_to_xyxy, xyxy_to_ltrb
from deepsuite.vision.heads.centernet import CenterNetHead, heatmap_peaks
from deepsuite.vision.heads.classification import ClassificationHead, ImageClassificationHead
from deepsuite.vision.heads.heatmap import HeatmapHead

__all__ = [
    "BoxHead",
    "CenterNetHead",
    "ClassificationHead",
    "HeatmapHead",
    "ImageClassificationHead",
    "anchor_points",
    "heatmap_peaks",
    "ltrb_to_xyxy",
    "xyxy_to_ltrb",
]
