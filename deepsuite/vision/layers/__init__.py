"""The seeds' specialised layers: ResNet bottleneck, complex conv/batch-norm, DFT, Hermite, Laguerre.

Also reachable as ``deepsuite.layers.<Name>`` (lazily forwarded there for the seed imports).
"""

from deepsuite.vision.layers.bottleneck import Bottleneck
from deepsuite.vision.layers.complex import ComplexBatchNorm2d, ComplexConv2d, merge_complex, split_complex
from deepsuite.vision.layers.dft import DFT, dft, dft_matrix
from deepsuite.vision.layers.hermite import HermiteFeatures, hermite_polynomials
from deepsuite.vision.layers.laguerre import LaguerreFeatures, laguerre_polynomials

__all__ = [
    "DFT",
    "Bottleneck",
    "ComplexBatchNorm2d",
    "ComplexConv2d",
    "HermiteFeatures",
    "LaguerreFeatures",
    "dft",
    "dft_matrix",
    "hermite_polynomials",
    "laguerre_polynomials",
    "merge_complex",
    "split_complex",
]
