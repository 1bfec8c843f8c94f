"""The chunked symmetric InfoNCE against the textbook cross-entropy form: value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from pairfree import losses


@pytest.mark.parametrize("n, d, chunk, temperature", [(7, 5, 3, 0.05), (64, 16, 64, 0.05), (300, 32, 128, 0.01)])
def test_info_nce_matches_cross_entropy_form(n, d, chunk, temperature):
    g = torch.Generator().manual_seed(n)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    fast = losses.info_nce(a, b, temperature, chunk)
    ref = losses.info_nce_reference(a, b, temperature)
    assert abs(fast.item() - ref.item()) < 1e-10
    for x, y in zip(torch.autograd.grad(fast, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)
    if n < 10:  # finite differences over every input: only on the smallest case
        assert torch.autograd.gradcheck(lambda x, y: losses.info_nce(x, y, temperature, chunk), (a, b))


def test_info_nce_float32_large_logits_and_upstream_gradient():
    """τ = 0.01 puts logits near ±100: the chunked log-sum-exp stays finite and exact in float32."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(513, 8, generator=g), dim=-1).requires_grad_()
    b = F.normalize(a.detach() + 0.1 * torch.randn(513, 8, generator=g), dim=-1).requires_grad_()
    fast, ref = 3.0 * losses.info_nce(a, b, 0.01, 100), 3.0 * losses.info_nce_reference(a, b, 0.01)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-5)
    for x, y in zip(torch.autograd.grad(fast, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        losses.info_nce(torch.zeros(4, 3), torch.zeros(5, 3), 0.05)
    with pytest.raises(ValueError, match="n >= 1"):
        losses.info_nce(torch.zeros(0, 3), torch.zeros(0, 3), 0.05)


@pytest.mark.parametrize("keep", [True, False])
def test_info_nce_shifted_paths_match_reference(monkeypatch, keep):
    """At τ = 0.05 one exp per logit serves both softmaxes; with the exp-logits kept for the backward
    pass or (large batches) recomputed, value and gradients equal the textbook form; a second
    backward through the same graph (retain_graph) gets the same gradients, so the kept chunks are
    not written over."""
    monkeypatch.setattr(losses, "_KEEP_ELEMENTS", 1 << 26 if keep else 0)
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    fast, ref = losses.info_nce(a, b, 0.05, 64), losses.info_nce_reference(a, b, 0.05)
    assert abs(fast.item() - ref.item()) < 1e-10
    first = torch.autograd.grad(fast, (a, b), retain_graph=True)
    for x, y in zip(first, torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)
    for x, y in zip(first, torch.autograd.grad(fast, (a, b))):
        assert torch.equal(x, y)


def test_info_nce_under_bf16_autocast_is_close_to_fp32():
    """GEMMs in bf16, softmax statistics in fp32: loss within 1e-2 relative, gradients aligned."""
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(512, 64, generator=g), dim=-1).requires_grad_()
    b = F.normalize(a.detach() + 0.5 * torch.randn(512, 64, generator=g), dim=-1)
    ref = losses.info_nce(a, b, 0.05)
    (ga,) = torch.autograd.grad(ref, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = losses.info_nce(a, b, 0.05)
    (gl,) = torch.autograd.grad(low, a)
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 1e-2 * ref.item()
    assert F.cosine_similarity(gl.flatten(), ga.flatten(), dim=0) > 0.999


def test_info_nce_bf16_gradients_at_the_papers_width_against_float64():
    """At d = 512 a row's gradient is a small difference (its softmax average of b minus its positive):
    formed after a bf16 GEMM had rounded the average it lost ~15 % (relative norm of the error, measured);
    formed inside the GEMM as (p − I)·b it keeps ~2 %."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(1024, 512, generator=g), dim=-1)
    b = F.normalize(a + 1.4 * torch.randn(1024, 512, generator=g) / 512**0.5, dim=-1)
    a64 = a.double().requires_grad_()
    ref = losses.info_nce_reference(a64, b.double(), 0.05)
    (g64,) = torch.autograd.grad(ref, a64)
    x = a.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = losses.info_nce(x, b, 0.05, chunk=256)
    (gl,) = torch.autograd.grad(low, x)
    assert abs(low.item() - ref.item()) < 1e-3
    assert (gl.double() - g64).norm() / g64.norm() < 0.04
