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
