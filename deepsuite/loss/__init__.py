"""Language-model losses: fused linear cross-entropy (never full logits), MTP loss, metrics.

Vision losses live in `deepsuite.vision`.
"""

from deepsuite.loss.backends import fused_linear_cross_entropy, resolve_loss_backend
from deepsuite.loss.language_modeling import (
    LanguageModelingLoss,
    MultiTokenPredictionLoss,
    PerplexityMetric,
    TokenAccuracyMetric,
    combine_mtp_losses,
)
from deepsuite.loss.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "LanguageModelingLoss",
    "MultiTokenPredictionLoss",
    "PerplexityMetric",
    "TokenAccuracyMetric",
    "combine_mtp_losses",
    "fused_linear_cross_entropy",
    "linear_cross_entropy",
    "resolve_loss_backend",
]
