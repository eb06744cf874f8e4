"""Chunked linear cross-entropy against materialised logits + F.cross_entropy (float64 reference)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from deepsuite.loss import fused_linear_cross_entropy, linear_cross_entropy, resolve_loss_backend
from deepsuite.loss.backends import naive_linear_cross_entropy
from deepsuite.loss.linear_cross_entropy import _softmax_, chunk_rows

IGNORE = -100
lce_module = importlib.import_module("deepsuite.loss.linear_cross_entropy")


def make_case(
    shape: tuple[int, ...] = (14,),
    d_model: int = 12,
    vocab: int = 37,
    dtype: torch.dtype = torch.float64,
    n_ignored: int = 3,
    bias: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d_model, generator=g, dtype=torch.float64)
    # Scale so that the softmax is far from uniform: the gradient terms are then not all alike.
    weight = 0.7 * torch.randn(vocab, d_model, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = IGNORE
    tensors = [hidden.to(dtype), weight.to(dtype)] + ([b.to(dtype)] if b is not None else [])
    for t in tensors:
        t.requires_grad_(True)
    return tensors[0], tensors[1], tensors[2] if bias else None, labels


def reference(hidden, weight, bias, labels, **kw):
    """Loss of the naive path computed in float64 (and its float64 leaves)."""
    h, w, b = (
        None if t is None else t.detach().double().requires_grad_(t.requires_grad)
        for t in (hidden, weight, bias)
    )
    logits = F.linear(h, w, b)
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, **kw)
    if kw.get("reduction") == "none":
        loss = loss.view(labels.shape)
    return loss, h, w, b


def run_both(hidden, weight, bias, labels, upstream_seed=1, **kw):
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    kw.pop("chunk_size", None)
    kw.pop("precompute_grad", None)
    ref, h, w, b = reference(hidden, weight, bias, labels, **kw)
    upstream = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64
    )
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    ref_inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream)
    return loss, grads, ref, ref_grads


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise ``|a - e| <= rtol * max|e|`` (relative to the tensor's scale) plus NaN equality."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_matches_naive_float64(reduction, label_smoothing, precompute_grad):
    # chunk 4 does not divide the 11 valid tokens
    hidden, weight, bias, labels = make_case()
    loss, grads, ref, ref_grads = run_both(
        hidden,
        weight,
        bias,
        labels,
        reduction=reduction,
        label_smoothing=label_smoothing,
        chunk_size=4,
        precompute_grad=precompute_grad,
    )
    assert loss.dtype == torch.float64 and loss.shape == ref.shape
    assert_rel_close(loss, ref, 1e-12)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_float32_within_1e6_of_float64_reference(reduction, label_smoothing):
    hidden, weight, bias, labels = make_case(shape=(3, 7), dtype=torch.float32, n_ignored=4, vocab=53)
    loss, grads, ref, ref_grads = run_both(
        hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing, chunk_size=5
    )
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert_rel_close(loss, ref, 1e-6)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-6)


def test_three_dim_inputs_and_no_bias():
    hidden, weight, _, labels = make_case(shape=(2, 5), bias=False, n_ignored=2)
    loss, grads, ref, ref_grads = run_both(hidden, weight, None, labels, reduction="none", chunk_size=3)
    assert loss.shape == (2, 5)
    assert (loss[labels == IGNORE] == 0).all()
    assert_rel_close(loss, ref, 1e-12)
    assert grads[0].shape == hidden.shape
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ignored_matches_torch(reduction, label_smoothing):
    hidden, weight, bias, labels = make_case(shape=(2, 3))
    labels.fill_(IGNORE)
    loss, grads, ref, ref_grads = run_both(
        hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing
    )
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    for g, r in zip(grads, ref_grads):
        assert (g == 0).all() and (r == 0).all()


def test_bfloat16_within_bf16_tolerance(monkeypatch):
    monkeypatch.setattr(lce_module, "_SCRATCH_BYTES", 3 * 97 * 4)  # float blocks of 3 rows
    hidden, weight, bias, labels = make_case(shape=(4, 6), d_model=32, vocab=97, dtype=torch.bfloat16)
    loss, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, label_smoothing=0.1, chunk_size=7)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 2e-2)


@pytest.mark.parametrize("precompute_grad", [None, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bf16_matches_naive_under_autocast(monkeypatch, reduction, precompute_grad):
    """float32 leaves under CPU autocast: bf16 matmuls (as F.linear there), float32 loss and
    gradients; several chunks, and float blocks of 2 rows with a partial one."""
    monkeypatch.setattr(lce_module, "_SCRATCH_BYTES", 2 * 97 * 4)
    hidden, weight, bias, labels = make_case(shape=(4, 6), d_model=32, vocab=97, dtype=torch.float32)
    kw = {"label_smoothing": 0.1, "reduction": reduction}
    upstream = torch.randn(
        labels.shape if reduction == "none" else (), generator=torch.Generator().manual_seed(3)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(
            hidden, weight, labels, bias=bias, chunk_size=7, precompute_grad=precompute_grad, **kw
        )
        naive = naive_linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    assert loss.dtype == torch.float32
    leaves = (hidden, weight, bias)
    grads = torch.autograd.grad(loss, leaves, upstream)
    naive_grads = torch.autograd.grad(naive, leaves, upstream)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert_rel_close(loss, naive, 2e-3)
    for g, r in zip(grads, naive_grads):
        assert_rel_close(g, r, 2e-2)
    # the matmuls did run in bf16: the float32 result differs, the float64 reference is near
    fp32 = linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    assert not torch.equal(loss, fp32)
    ref, *_ = reference(hidden, weight, bias, labels, **kw)
    assert_rel_close(loss, ref, 2e-2)


def test_autocast_accepts_mixed_dtypes():
    hidden, weight, _, labels = make_case(shape=(2, 5), d_model=16, vocab=41, dtype=torch.float32, bias=False)
    hidden = hidden.detach().bfloat16().requires_grad_(True)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    ref, h, w, _ = reference(hidden, weight, None, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    assert_rel_close(loss, ref, 2e-2)
    for g, r in zip((grad_h, grad_w), ref_grads):
        assert_rel_close(g, r, 2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    hidden, weight, bias, labels = make_case(shape=(5,), d_model=4, vocab=6, n_ignored=1)

    # gradcheck runs backward several times through one graph, which the precomputed gradient
    # does not allow (test_backward_twice); that path is checked against the reference above.
    def fn(h, w, b):
        return linear_cross_entropy(
            h,
            w,
            labels,
            bias=b,
            reduction=reduction,
            label_smoothing=0.1,
            chunk_size=2,
            precompute_grad=False,
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_memory_budget_caps_chunk(monkeypatch):
    assert chunk_rows(4096, 129_280) == (256 * 1024 * 1024) // (129_280 * 4)
    assert chunk_rows(8, 100) == 8
    # A budget of 3 rows of logits overrides chunk_size and still gives the exact result.
    monkeypatch.setattr(lce_module, "_CHUNK_BYTES", 3 * 37 * 4)
    hidden, weight, bias, labels = make_case()
    loss, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, chunk_size=4096)
    assert_rel_close(loss, ref, 1e-12)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-12)


def test_never_allocates_full_logits():
    n_tokens, vocab, d_model = 256, 2000, 4
    hidden = torch.randn(n_tokens, d_model, requires_grad=True)
    weight = torch.randn(vocab, d_model, requires_grad=True)
    labels = torch.randint(0, vocab, (n_tokens,))
    full_logits_bytes = n_tokens * vocab * 4
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        linear_cross_entropy(hidden, weight, labels, chunk_size=16).backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= full_logits_bytes // 8
    # the probe works: the naive path does allocate full logits
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        naive_linear_cross_entropy(hidden, weight, labels).backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= full_logits_bytes


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
@pytest.mark.parametrize("shape", [(5, 1000), (3, 37), (2, 70_000)])
def test_in_place_softmax_is_exact(device, shape):
    z = torch.randn(*shape, device=device) * 30
    expected = torch.softmax(z, dim=1)
    torch.testing.assert_close(_softmax_(z.clone()), expected, rtol=0, atol=0)


def test_weight_only_grad_and_no_grad_mode():
    hidden, weight, _bias, labels = make_case()
    hidden = hidden.detach()
    _loss, grads, ref, ref_grads = run_both(hidden, weight, None, labels)
    assert len(grads) == 1
    assert_rel_close(grads[0], ref_grads[0], 1e-12)
    with torch.no_grad():
        no_grad = linear_cross_entropy(hidden, weight, labels)
    assert not no_grad.requires_grad
    assert_rel_close(no_grad, ref, 1e-12)


def test_backward_twice():
    hidden, weight, _bias, labels = make_case()
    loss = linear_cross_entropy(hidden, weight, labels, precompute_grad=False)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * first)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs():
    hidden, weight, _bias, labels = make_case()
    bad = labels.clone()
    bad[0] = 37
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(hidden.float(), weight, labels)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :-1], labels)


def test_backends_on_cpu():
    assert resolve_loss_backend("auto", "cpu") == "chunked"
    assert resolve_loss_backend("naive", torch.device("cpu")) == "naive"
    for name in ("cce", "liger"):
        with pytest.raises(ValueError, match=r"pip install|CUDA"):
            resolve_loss_backend(name, "cpu")
    with pytest.raises(ValueError, match="loss backend must be one of"):
        resolve_loss_backend("fast", "cpu")
    hidden, weight, _, labels = make_case(shape=(2, 7), bias=False)
    for reduction in ("mean", "sum", "none"):
        kw = {"label_smoothing": 0.1, "reduction": reduction}
        naive = fused_linear_cross_entropy(hidden, weight, labels, backend="naive", **kw)
        chunked = fused_linear_cross_entropy(hidden, weight, labels, backend="chunked", chunk_size=3, **kw)
        auto = fused_linear_cross_entropy(hidden, weight, labels, **kw)
        assert naive.shape == chunked.shape == auto.shape
        assert_rel_close(chunked, naive, 1e-12)
        assert_rel_close(auto, naive, 1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_on_cuda(dtype):
    hidden, weight, bias, labels = make_case(shape=(4, 9), d_model=64, vocab=1000, dtype=dtype)
    hidden, weight, bias = (t.detach().cuda().requires_grad_() for t in (hidden, weight, bias))
    loss, grads, ref, ref_grads = run_both(
        hidden, weight, bias, labels.cuda(), label_smoothing=0.1, chunk_size=5
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel_close(loss, ref, tol)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("tokens", "vocab", "d_model", "chunk"), [(1024, 50257, 64, 4096), (100, 3000, 32, 64)]
)
def test_work_buffer_bytes_equal_the_buffers_the_loss_allocates(
    dtype: torch.dtype, tokens: int, vocab: int, d_model: int, chunk: int
) -> None:
    """The memory planner's figure is the sum of the real chunk buffers + the hidden-state grad."""
    from deepsuite.loss.linear_cross_entropy import _ChunkBuffers, work_buffer_bytes

    buffers = _ChunkBuffers(chunk, tokens, vocab, d_model, dtype, torch.float32, torch.device("cpu"))
    grad_w_low = buffers.grad_w_low(True)
    allocated = buffers.logits.nbytes + tokens * d_model * 4
    allocated += 0 if buffers.scratch is None else buffers.scratch.nbytes
    allocated += 0 if grad_w_low is None else grad_w_low.nbytes
    assert work_buffer_bytes(tokens, vocab, d_model, dtype, chunk) == allocated
    if dtype == torch.bfloat16:
        assert buffers.scratch is not None and grad_w_low is not None  # both exist and are counted
