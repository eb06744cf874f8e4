"""Language-model output heads. Vision heads live in `deepsuite.vision`."""

from deepsuite.heads.lm_head import LM_IGNORE_INDEX, LMHead
from deepsuite.heads.mtp_head import CombinedLMHead, MTPHead
from deepsuite.heads.split_lm_head import SplitLanguageModellingHead

__all__ = ["LM_IGNORE_INDEX", "CombinedLMHead", "LMHead", "MTPHead", "SplitLanguageModellingHead"]
