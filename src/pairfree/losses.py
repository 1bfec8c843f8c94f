"""Contrastive and intra-space alignment terms shared by C-MCR and Ex-MCR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, chunk: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives; row i of a and b is the positive pair.

    Equal to 0.5 * (CE(a bᵀ/τ, arange) + CE(b aᵀ/τ, arange)), computed by `_SymmetricInfoNCE` in
    row chunks: the (n, n) logits are never held whole, and the backward pass recomputes them chunk
    by chunk instead of keeping softmax matrices. On CPU this is several times faster than the
    autograd version at the paper's batch of 4096 (fewer passes over n² floats, no 64 MB
    allocations per op), and on GPU it caps memory at large batches.
    """
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"info_nce needs two (n, d) tensors of the same shape with n >= 1, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if chunk is None:
        chunk = max(1, CPU_CHUNK_ELEMENTS // a.shape[0]) if a.device.type == "cpu" else 8192
    dev = a.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return _SymmetricInfoNCE.apply(a, b, 1.0 / float(temperature), int(chunk), compute)


def info_nce_reference(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook autograd form of `info_nce` (tests compare against it)."""
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


#: logits per chunk on CPU (B = 4096: 1024 rows, 16 MB): 1.09x a step of 256 rows on the AVX2 machine;
#: twice as many (32 MB) reach glibc's largest mmap threshold, so each chunk would be mapped afresh
CPU_CHUNK_ELEMENTS = 1 << 22
#: keep the (n, n) exp-logits between forward and backward up to this many elements (B = 4096: 16.8M)
_KEEP_ELEMENTS = 1 << 26
#: largest logit range whose exp() stays a normal float after a fixed shift (e^-80 > fp32's 1.2e-38)
_SAFE_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


class _SymmetricInfoNCE(torch.autograd.Function):
    """loss = ½·mean_i lse_j(L_ij) + ½·mean_j lse_i(L_ij) − mean_i L_ii with L = a bᵀ/τ.

    dloss/dL = (softmax_rows(L) + softmax_cols(L)) / 2n − I/n, applied chunk by chunk.

    The logits are bounded by inv_t·max|a|·max|b| (Cauchy-Schwarz; inv_t for unit rows). When twice
    that bound fits the float range, one exp(L − bound) per element serves both softmaxes (row and
    column sums of the same matrix) in the forward pass, and is kept for the backward pass when the
    batch is small enough (B = 4096: 67 MB), which then needs no logits and no exp at all:
    dL = E ⊙ (r_i + c_j) / 2 with r = e^(bound − row_lse), c = e^(bound − col_lse). Otherwise (tiny τ)
    the running-max form is used. At the paper's τ = 0.05 this is half the exp() work of two separate
    log-sum-exps, and the backward's GEMM for the logits is saved too.

    Under autocast (`compute` = bf16 / fp16) the GEMMs run in that dtype and everything after them
    (scaling by 1/τ, exp, log-sum-exps, softmax, accumulation) in fp32. torch has no fp32-output bf16
    GEMM on CPU, so what leaves a GEMM is rounded to bf16: the logits' GEMM returns the dot products
    (relative rounding, ±0.04 as a logit near 1/τ = 20, where logits rounded to bf16 would be off by
    up to ±0.06), and the gradient's GEMMs take p − I, so they return the small gradient itself rather
    than p·b, from which b would be subtracted after rounding (~15 % error at d = 512 that way, ~2 %
    this way; tested). Shifting the logits inside their GEMM (L − bound, as the IVF kernel does with a
    centroid's score) would round worse here: the Cauchy-Schwarz bound lies far above the logits of
    dissimilar pairs, e.g. at the start of training.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, inv_t: float, chunk: int, compute) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        if compute is not None:
            a, b = a.float(), b.float()
        ac, bc = (a, b) if compute is None else (a.to(compute), b.to(compute))
        n = a.shape[0]
        bound = inv_t * float(a.norm(dim=1).max()) * float(b.norm(dim=1).max())
        shifted = 2 * bound <= _SAFE_RANGE.get(a.dtype, 80.0)
        keep = shifted and n * n <= _KEEP_ELEMENTS
        exps: list[torch.Tensor] = []  # the chunks as computed: no copy, and no (n, n) block mmap'd per step
        row_lse = a.new_empty(n)
        col = a.new_zeros(n) if shifted else a.new_full((n,), float("-inf"))
        for s in range(0, n, chunk):
            logits = (ac[s : s + chunk] @ bc.T).to(a.dtype).mul_(inv_t)
            if shifted:
                e = logits.sub_(bound).exp_()
                row_lse[s : s + chunk] = e.sum(1).log_().add_(bound)
                col += e.sum(0)
                if keep:
                    exps.append(e)
            else:
                row_lse[s : s + chunk] = torch.logsumexp(logits, 1)
                col = torch.logaddexp(col, torch.logsumexp(logits, 0))
        col_lse = col.log().add_(bound) if shifted else col
        diag = (a * b).sum(1).mul_(inv_t)
        ctx.save_for_backward(a, b, row_lse, col_lse, *exps)
        ctx.inv_t, ctx.chunk, ctx.compute, ctx.bound, ctx.mode = inv_t, chunk, compute, bound, (
            "kept" if keep else "shifted" if shifted else "max")
        return 0.5 * (row_lse.mean() + col_lse.mean()) - diag.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, row_lse, col_lse, *kept = ctx.saved_tensors
        inv_t, chunk, compute, bound, mode = ctx.inv_t, ctx.chunk, ctx.compute, ctx.bound, ctx.mode
        ac, bc = (a, b) if compute is None else (a.to(compute), b.to(compute))
        n = a.shape[0]
        scale = grad * inv_t / n
        grad_a, grad_b = torch.empty_like(a), torch.zeros_like(b)
        if mode != "max":
            r, c = torch.exp(bound - row_lse).mul_(0.5), torch.exp(bound - col_lse).mul_(0.5)
        for k, s in enumerate(range(0, n, chunk)):
            if mode == "max":
                logits = (ac[s : s + chunk] @ bc.T).to(a.dtype).mul_(inv_t)
                p = torch.exp(logits - col_lse)
                p.add_(logits.sub_(row_lse[s : s + chunk, None]).exp_()).mul_(0.5)
            else:
                e = kept[k] if mode == "kept" else \
                    (ac[s : s + chunk] @ bc.T).to(a.dtype).mul_(inv_t).sub_(bound).exp_()
                p = (r[s : s + chunk, None] + c[None, :]).mul_(e)
            p.diagonal(s).sub_(1.0)  # the −mean(diag) term, inside the GEMMs (see the class docstring)
            if compute is None:
                grad_a[s : s + chunk] = p @ b
                grad_b.addmm_(p.T, a[s : s + chunk])
            else:
                pc = p.to(compute)
                grad_a[s : s + chunk] = (pc @ bc).float()
                grad_b += (pc.T @ ac[s : s + chunk]).float()
        grad_a.mul_(scale)
        grad_b.mul_(scale)
        return grad_a, grad_b, None, None, None


def squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared L2 distance between matched rows (C-MCR's intra-MCR term)."""
    return (a - b).pow(2).sum(dim=-1).mean()


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean (non-squared) L2 distance between matched rows (Ex-MCR's L_intra, as printed)."""
    return (a - b).norm(dim=-1).mean()


def add_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None) -> torch.Tensor:
    """Semantic completion: Gaussian noise of the given per-dimension variance, then re-normalise."""
    if variance <= 0:
        return x
    # drawn on the generator's device (CPU) so runs are reproducible on any compute device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return F.normalize(x + noise * variance**0.5, dim=-1)
