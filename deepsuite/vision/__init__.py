"""Secondary vision package: heads, detection losses, targets, metrics and the seeds' specialised layers.

Imports only torch and itself; nothing on the LLM path imports it.

- heads (`deepsuite.vision.heads`): `ClassificationHead` (with ``pooling_mask``),
  `ImageClassificationHead`, `BoxHead`, `CenterNetHead`, `HeatmapHead`;
- losses (`deepsuite.vision.losses`): `FocalLoss`, `GIoULoss`, `DIoULoss`, `CenterNetLoss`;
- targets (`deepsuite.vision.targets`): `gaussian_radius`, `draw_gaussian`, `build_centernet_targets`;
- metrics (`deepsuite.vision.metrics`): `average_precision`;
- layers (`deepsuite.vision.layers`): `Bottleneck`, `ComplexConv2d`, `ComplexBatchNorm2d`, `DFT`,
  `HermiteFeatures`, `LaguerreFeatures`.
"""

from deepsuite.vision.heads import (
    BoxHead,
    CenterNetHead,
    ClassificationHead,
    HeatmapHead,
    ImageClassificationHead,
)
from deepsuite.vision.layers import (
    DFT,
    Bottleneck,
    ComplexBatchNorm2d,
    ComplexConv2d,
    HermiteFeatures,
    LaguerreFeatures,
)
from deepsuite.vision.losses import CenterNetLoss, DIoULoss, FocalLoss, GIoULoss
from deepsuite.vision.metrics import average_precision
from deepsuite.vision.targets import build_centernet_targets, draw_gaussian, gaussian_radius

__all__ = [
    "DFT",
    "Bottleneck",
    "BoxHead",
    "CenterNetHead",
    "CenterNetLoss",
    "ClassificationHead",
    "ComplexBatchNorm2d",
    "ComplexConv2d",
    "DIoULoss",
    "FocalLoss",
    "GIoULoss",
    "HeatmapHead",
    "HermiteFeatures",
    "ImageClassificationHead",
    "LaguerreFeatures",
    "average_precision",
    "build_centernet_targets",
    "draw_gaussian",
    "gaussian_radius",
]
