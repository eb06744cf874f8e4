"""Specialised layers: bottleneck, complex conv / batch-norm vs complex dtype, DFT vs torch.fft, polynomials."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.polynomial import hermite, hermite_e, laguerre
from torch import nn

import deepsuite.vision
from deepsuite.vision.layers import (
    DFT,
    Bottleneck,
    ComplexBatchNorm2d,
    ComplexConv2d,
    HermiteFeatures,
    LaguerreFeatures,
    dft,
)


def test_vision_package_exports_the_specialised_layers():
    for name in (
        "Bottleneck",
        "ComplexConv2d",
        "ComplexBatchNorm2d",
        "DFT",
        "HermiteFeatures",
        "LaguerreFeatures",
    ):
        assert getattr(deepsuite.vision, name) is getattr(deepsuite.vision.layers, name)


# ---------------------------------------------------------------- bottleneck


def test_bottleneck_resnet50_block_shapes_and_parameter_count():
    block = Bottleneck(64, 64)  # ResNet-50 layer1[0]: projection shortcut 64 → 256
    assert sum(p.numel() for p in block.parameters()) == 75_008  # torchvision's count for this block
    assert block(torch.randn(2, 64, 8, 8)).shape == (2, 256, 8, 8)
    down = Bottleneck(256, 128, stride=2)  # layer2[0]
    assert (down.conv1.stride, down.conv2.stride) == ((1, 1), (2, 2))  # v1.5: stride on the 3×3 conv
    assert down(torch.randn(1, 256, 8, 8)).shape == (1, 512, 4, 4)
    assert Bottleneck(256, 64).downsample is None  # shapes match: identity shortcut


def test_bottleneck_forward_equals_composition_and_zero_init_residual():
    torch.manual_seed(0)
    block = Bottleneck(16, 4, stride=2).double().eval()
    for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)

    def bn(module, t):
        return (t - module.running_mean[:, None, None]) / torch.sqrt(
            module.running_var[:, None, None] + module.eps
        ) * (module.weight[:, None, None]) + module.bias[:, None, None]

    out = torch.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight)))
    out = torch.relu(bn(block.bn2, F.conv2d(out, block.conv2.weight, stride=2, padding=1)))
    out = bn(block.bn3, F.conv2d(out, block.conv3.weight))
    shortcut = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    torch.testing.assert_close(block(x), torch.relu(out + shortcut))

    identity_block = Bottleneck(16, 4, zero_init_residual=True)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(identity_block(x), torch.relu(x))
    custom = Bottleneck(16, 4, downsample=nn.Identity())
    assert isinstance(custom.downsample, nn.Identity)


# ---------------------------------------------------------------- complex layers


@pytest.mark.parametrize(
    "kwargs", [{}, {"stride": 2, "padding": 1}, {"padding": 2, "dilation": 2, "groups": 2}, {"bias": False}]
)
def test_complex_conv_equals_complex_dtype_convolution(kwargs):
    torch.manual_seed(1)
    conv = ComplexConv2d(4, 6, 3, **kwargs).double()
    if conv.bias is not None:
        conv.bias.data.normal_()
    z = torch.randn(2, 4, 9, 8, dtype=torch.complex128)
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    expected = F.conv2d(z, conv.complex_weight, **conv_kwargs)
    if conv.bias is not None:
        expected = expected + torch.complex(conv.bias[:, 0], conv.bias[:, 1])[None, :, None, None]
    out_native = conv(z)
    out_pairs = conv(torch.view_as_real(z))  # (B, C, H, W, 2)
    assert out_native.dtype == torch.complex128 and out_pairs.shape == (*expected.shape, 2)
    torch.testing.assert_close(out_native, expected)
    torch.testing.assert_close(torch.view_as_complex(out_pairs.contiguous()), expected)


def test_complex_conv_rejects_ambiguous_inputs():
    conv = ComplexConv2d(3, 2, 3)
    with pytest.raises(ValueError, match="real, imag"):
        conv(torch.randn(1, 3, 5, 5))  # real input without a (real, imag) last dimension
    with pytest.raises(ValueError, match="batched"):
        conv(torch.randn(3, 5, 5, dtype=torch.complex64))


def test_complex_conv_gradients_match_complex_dtype_autograd():
    torch.manual_seed(2)
    conv = ComplexConv2d(3, 2, 3, padding=1).double()
    z = torch.randn(1, 3, 5, 5, dtype=torch.complex128)
    target = torch.randn(1, 2, 5, 5, dtype=torch.complex128)
    (conv(z) - target).abs().pow(2).sum().backward()
    weight = conv.complex_weight.detach().requires_grad_()
    (F.conv2d(z, weight, padding=1) - target).abs().pow(2).sum().backward()
    # PyTorch's complex gradient is the conjugate Wirtinger derivative ×2: (∂/∂A + i ∂/∂B)
    torch.testing.assert_close(
        torch.complex(conv.conv_real.weight.grad, conv.conv_imag.weight.grad), weight.grad
    )


def complex_bn_reference(
    z: torch.Tensor, mean: torch.Tensor, covar: torch.Tensor, gamma: torch.Tensor, beta, eps
):
    """Whitening as a widely-linear complex map ``a·z + b·conj(z)``; V^{-1/2} by eigendecomposition.

    ``mean`` (C,) complex, ``covar`` (C, 2, 2), ``gamma`` (C, 2, 2), ``beta`` (C,) complex.
    """
    out = torch.empty_like(z)
    for c in range(z.shape[1]):
        evals, evecs = torch.linalg.eigh(covar[c] + eps * torch.eye(2, dtype=torch.float64))
        m = gamma[c] @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # real 2×2 acting on (re, im)
        a = complex((m[0, 0] + m[1, 1]).item() / 2, (m[1, 0] - m[0, 1]).item() / 2)
        b = complex((m[0, 0] - m[1, 1]).item() / 2, (m[1, 0] + m[0, 1]).item() / 2)
        centred = z[:, c] - mean[c]
        out[:, c] = a * centred + b * centred.conj() + beta[c]
    return out


def batch_covariance(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel complex mean and the biased 2×2 covariance of (re, im), via torch.cov."""
    means, covs = [], []
    for c in range(z.shape[1]):
        values = z[:, c].reshape(-1)
        means.append(values.mean())
        covs.append(torch.cov(torch.stack((values.real, values.imag)), correction=0))
    return torch.stack(means), torch.stack(covs)


def test_complex_batch_norm_training_equals_complex_reference_and_whitens():
    torch.manual_seed(3)
    bn = ComplexBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(
            torch.tensor([[1.0, 2.0, 0.3], [0.5, 0.7, -0.2], [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]])
        )
        bn.bias.normal_()
    # correlated, off-centre real and imaginary parts
    base = torch.randn(8, 3, 5, 6, 2, dtype=torch.float64)
    mix = torch.tensor([[2.0, 0.0], [1.5, 0.5]], dtype=torch.float64)
    pairs = base @ mix.T + torch.tensor([3.0, -1.0], dtype=torch.float64)
    z = torch.view_as_complex(pairs.contiguous())

    out = bn(z)
    mean, cov = batch_covariance(z)
    w = bn.weight.detach()
    gamma = torch.stack(
        (torch.stack((w[:, 0], w[:, 2]), -1), torch.stack((w[:, 2], w[:, 1]), -1)), -2
    )  # (C, 2, 2)
    beta = torch.complex(bn.bias[:, 0], bn.bias[:, 1]).detach()
    expected = complex_bn_reference(z, mean, cov, gamma, beta, bn.eps)
    torch.testing.assert_close(out.detach(), expected)
    # the (…, 2) layout gives the same numbers
    bn_pairs = ComplexBatchNorm2d(3).double()
    bn_pairs.load_state_dict(bn.state_dict())
    bn_pairs.reset_running_stats()
    torch.testing.assert_close(bn_pairs(pairs), torch.view_as_real(out.detach()))
    # the output covariance is Γ·Γᵀ (whitened, then mixed by Γ)
    _, out_cov = batch_covariance(out.detach())
    torch.testing.assert_close(out_cov, gamma @ gamma.transpose(1, 2), rtol=1e-4, atol=1e-4)

    # running statistics: one momentum step from (0, I) towards the unbiased batch statistics
    n = 8 * 5 * 6
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.view_as_real(mean))
    unbiased = cov * n / (n - 1)
    expected_covar = 0.9 * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) + 0.1 * torch.stack(
        (unbiased[:, 0, 0], unbiased[:, 1, 1], unbiased[:, 0, 1]), -1
    )
    torch.testing.assert_close(bn.running_covar, expected_covar)
    assert bn.num_batches_tracked.item() == 1


def test_complex_batch_norm_layouts_agree_and_eval_uses_running_stats():
    torch.manual_seed(4)
    bn = ComplexBatchNorm2d(2).double()
    z = torch.randn(4, 2, 3, 3, dtype=torch.complex128) * 2 + 1j
    pairs = torch.view_as_real(z)
    bn_pairs = ComplexBatchNorm2d(2).double()
    torch.testing.assert_close(torch.view_as_real(bn(z)), bn_pairs(pairs))
    torch.testing.assert_close(bn.running_covar, bn_pairs.running_covar)

    bn.eval()
    mean = torch.complex(bn.running_mean[:, 0], bn.running_mean[:, 1])
    rc = bn.running_covar
    covar = torch.stack((torch.stack((rc[:, 0], rc[:, 2]), -1), torch.stack((rc[:, 2], rc[:, 1]), -1)), -2)
    gamma = torch.eye(2, dtype=torch.float64).expand(2, 2, 2) / math.sqrt(2)
    expected = complex_bn_reference(z, mean, covar, gamma, torch.zeros(2, dtype=torch.complex128), bn.eps)
    torch.testing.assert_close(bn(z), expected)
    with pytest.raises(ValueError, match="real, imag"):
        bn(torch.randn(4, 2, 3, 3))


def test_complex_batch_norm_gradients_finite():
    bn = ComplexBatchNorm2d(2)
    z = torch.randn(4, 2, 3, 3, 2, requires_grad=True)
    bn(z).pow(2).sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(bn.weight.grad).all()


# ---------------------------------------------------------------- DFT


@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_dft_equals_torch_fft_1d(norm, n):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(3, n, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(DFT(n, norm=norm)(z), torch.fft.fft(z, norm=norm))
    torch.testing.assert_close(DFT(n, inverse=True, norm=norm)(z), torch.fft.ifft(z, norm=norm))
    real = torch.randn(2, 5, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dft(real, norm=norm), torch.fft.fft(real, norm=norm))
    torch.testing.assert_close(DFT(n, inverse=True, norm=norm)(DFT(n, norm=norm)(z)), z)


@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
def test_dft_equals_torch_fft_2d_and_other_dims(norm):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, 10, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(DFT((6, 10), dim=(-2, -1), norm=norm)(z), torch.fft.fft2(z, norm=norm))
    torch.testing.assert_close(
        DFT((6, 10), dim=(2, 3), inverse=True, norm=norm)(z), torch.fft.ifft2(z, norm=norm)
    )
    torch.testing.assert_close(DFT(3, dim=1, norm=norm)(z), torch.fft.fft(z, dim=1, norm=norm))
    x32 = torch.randn(4, 64, generator=g)
    out32 = DFT(64)(x32)
    assert out32.dtype == torch.complex64
    torch.testing.assert_close(out32, torch.fft.fft(x32), rtol=1e-4, atol=1e-4)


def test_dft_gradients_equal_torch_fft_gradients():
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(4, 12, generator=g, dtype=torch.float64)
    x1 = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    (DFT(12, norm="ortho")(x1).abs().pow(2) * weights).sum().backward()
    (torch.fft.fft(x2, norm="ortho").abs().pow(2) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_dft_rejects_wrong_sizes_and_norms():
    with pytest.raises(ValueError, match="length 8"):
        DFT(8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="norm"):
        DFT(8, norm="unitary")
    with pytest.raises(ValueError, match="same number"):
        DFT((4, 4), dim=-1)


# ---------------------------------------------------------------- polynomials


def test_hermite_tabulated_values_and_numpy():
    x = torch.linspace(-3, 3, 41, dtype=torch.float64)
    h = HermiteFeatures(8)(x)  # physicists'
    assert h.shape == (41, 9)
    table = [
        torch.ones_like(x),
        2 * x,
        4 * x**2 - 2,
        8 * x**3 - 12 * x,
        16 * x**4 - 48 * x**2 + 12,
        32 * x**5 - 160 * x**3 + 120 * x,
    ]
    torch.testing.assert_close(h[:, :6], torch.stack(table, -1))
    for n in range(9):
        expected = hermite.hermval(x.numpy(), np.eye(9)[n])  # Clenshaw summation, not the recurrence
        torch.testing.assert_close(h[:, n], torch.from_numpy(expected), rtol=1e-12, atol=1e-9)

    he = HermiteFeatures(8, kind="probabilists")(x)
    table_e = [torch.ones_like(x), x, x**2 - 1, x**3 - 3 * x, x**4 - 6 * x**2 + 3]
    torch.testing.assert_close(he[:, :5], torch.stack(table_e, -1))
    for n in range(9):
        torch.testing.assert_close(
            he[:, n], torch.from_numpy(hermite_e.hermeval(x.numpy(), np.eye(9)[n])), rtol=1e-12, atol=1e-9
        )


def test_hermite_orthogonality_under_gauss_hermite_quadrature():
    nodes, weights = hermite.hermgauss(20)
    h = HermiteFeatures(6)(torch.from_numpy(nodes))  # (20, 7)
    gram = h.T @ (torch.from_numpy(weights)[:, None] * h)
    norms = torch.tensor(
        [math.sqrt(math.pi) * 2**n * math.factorial(n) for n in range(7)], dtype=torch.float64
    )
    torch.testing.assert_close(gram, torch.diag(norms), rtol=1e-9, atol=1e-7)


def laguerre_closed_form(x: float, n: int, alpha: float) -> float:
    """L_n^α(x) = Σ_i (−1)^i Γ(n+α+1) / (Γ(n−i+1) Γ(α+i+1)) x^i / i!."""
    return sum(
        (-1) ** i
        * math.gamma(n + alpha + 1)
        / (math.gamma(n - i + 1) * math.gamma(alpha + i + 1))
        * x**i
        / math.factorial(i)
        for i in range(n + 1)
    )


def test_laguerre_tabulated_values_numpy_and_generalised():
    x = torch.linspace(0, 12, 37, dtype=torch.float64)
    lag = LaguerreFeatures(7)(x)
    table = [torch.ones_like(x), 1 - x, (x**2 - 4 * x + 2) / 2, (-(x**3) + 9 * x**2 - 18 * x + 6) / 6]
    torch.testing.assert_close(lag[:, :4], torch.stack(table, -1))
    for n in range(8):
        torch.testing.assert_close(
            lag[:, n], torch.from_numpy(laguerre.lagval(x.numpy(), np.eye(8)[n])), rtol=1e-10, atol=1e-9
        )
    for alpha in (0.5, 2.0, -0.5):
        gen = LaguerreFeatures(6, alpha=alpha)(x)
        expected = torch.tensor(
            [[laguerre_closed_form(v, n, alpha) for n in range(7)] for v in x.tolist()], dtype=torch.float64
        )
        torch.testing.assert_close(gen, expected, rtol=1e-10, atol=1e-8)


def test_polynomial_feature_shapes_flatten_and_validation():
    x = torch.randn(2, 3, 4)
    assert HermiteFeatures(3)(x).shape == (2, 3, 4, 4)
    assert HermiteFeatures(3, flatten=True)(x).shape == (2, 3, 16)
    assert LaguerreFeatures(0, flatten=True)(x).shape == (2, 3, 4)
    torch.testing.assert_close(LaguerreFeatures(2, flatten=True)(x)[..., 1::3], 1 - x)  # L_1 of each input
    with pytest.raises(ValueError, match="kind"):
        HermiteFeatures(3, kind="chebyshev")
    with pytest.raises(ValueError, match="degree"):
        LaguerreFeatures(-1)
    with pytest.raises(ValueError, match="alpha"):
        LaguerreFeatures(2, alpha=-1.0)


@pytest.mark.gpu
def test_layers_and_decode_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from deepsuite.vision import CenterNetHead

    torch.manual_seed(5)
    z = torch.randn(2, 4, 8, 8, dtype=torch.complex64)
    for module in (ComplexConv2d(4, 3, 3, padding=1), ComplexBatchNorm2d(4), DFT(8, dim=-1)):
        cpu = module(z)
        torch.testing.assert_close(module.cuda()(z.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-4)
    head = CenterNetHead(4, 2, head_conv=8)
    x = torch.randn(2, 4, 16, 16)
    cpu_boxes, cpu_scores, _ = CenterNetHead.decode(head(x), k=5)
    gpu_boxes, gpu_scores, _ = CenterNetHead.decode(head.cuda()(x.cuda()), k=5)
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_boxes.cpu(), cpu_boxes, rtol=1e-4, atol=1e-3)
