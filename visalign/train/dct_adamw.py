"""DCT-AdamW: SVD-free low-rank adaptive gradient projection for full fine-tuning (``train.optimizer=dct_adamw``).

For a weight W ∈ ℝ^{m×n} with gradient G, let Q be the orthonormal DCT-II basis of the longer side (n when
n ≥ m). Every ``update_gap`` steps the r columns of Q best aligned with G are chosen, by the norms of G·Q's
columns (an SVD-free stand-in for GaLore's top singular vectors: Q·ᵀ is fixed, so only r indices are stored).
Adam runs in the r-dimensional space: g = G·Q_r (m×r), m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², and the update
is projected back, W ← W − η·α·(m̂/(√v̂ + ε))·Q_rᵀ − η·λ·W. Optimizer state is O(m·r) per matrix instead of
O(m·n). Vectors, scalars and matrices with a side ≤ r take the plain AdamW step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Orthonormal DCT-II basis as columns: Q[i, k] = c_k·cos(π(2i+1)k / 2n), c_0 = √(1/n), c_k = √(2/n)."""
    i = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    q = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    q[:, 0] = math.sqrt(1.0 / n)
    return q.to(dtype=dtype, device=device)


def best_columns(g: Tensor, basis: Tensor, rank: int, right: bool) -> Tensor:
    """Indices of the ``rank`` basis columns carrying the most of G's energy (right: G·Q, else Qᵀ·G)."""
    energy = (g @ basis).norm(dim=0) if right else (basis.T @ g).norm(dim=1)
    return torch.topk(energy, rank).indices.sort().values


class DCTAdamW(torch.optim.Optimizer):
    """AdamW whose matrix states live in a rank-r DCT subspace re-chosen every ``update_gap`` steps."""

    def __init__(self, params, lr: float = 1e-4, rank: int = 32, update_gap: int = 50, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, scale: float = 1.0):
        if rank < 1 or update_gap < 1:
            raise ValueError("DCTAdamW: rank and update_gap must be >= 1")
        defaults = dict(lr=lr, rank=rank, update_gap=update_gap, betas=betas, eps=eps, weight_decay=weight_decay,
                        scale=scale)
        super().__init__(params, defaults)
        self._bases: dict[tuple, Tensor] = {}

    def _basis(self, n: int, like: Tensor) -> Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._bases:
            self._bases[key] = dct_basis(n, like.dtype, like.device)
        return self._bases[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        g = p.grad.float().reshape(p.shape[0], -1) if p.dim() >= 2 else p.grad.float()
        low_rank = p.dim() >= 2 and min(g.shape) > group["rank"]
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        if low_rank:
            right = g.shape[1] >= g.shape[0]
            basis = self._basis(g.shape[1] if right else g.shape[0], g)
            if "indices" not in state or (t - 1) % group["update_gap"] == 0:  # moments carry over, as in GaLore
                state["indices"] = best_columns(g, basis, group["rank"], right)
            q = basis[:, state["indices"]]
            g = g @ q if right else q.T @ g
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
        if low_rank:
            u = (u @ q.T if right else q @ u) * group["scale"]
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(u.reshape(p.shape).to(p.dtype), alpha=-group["lr"])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's tensor state (moments and indices)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))
