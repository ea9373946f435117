"""Preference heads: per-sample losses of the DPO logit h (or of implicit rewards r). No reduction.

Each function is pure and stable for large |h| (log σ through ``logsigmoid``). The transfer from
LLM DPO replaces the policy/reference log-ratio by the diffusion surrogate h (DESIGN.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(h: Tensor) -> Tensor:
    """−log σ(h): Diffusion-DPO (Wallace et al. 2023, Eq. 14)."""
    return -F.logsigmoid(h)


def hinge_loss(h: Tensor) -> Tensor:
    """max(0, 1 − h): SLiC-style hinge (diffusers DPO example's 'hinge')."""
    return torch.relu(1.0 - h)


def ipo_loss(h: Tensor, tau: float) -> Tensor:
    """(h − 1/(2τ))²: IPO (Azar et al. 2023, Eq. 17) on the diffusion logit."""
    return (h - 1.0 / (2.0 * tau)) ** 2


def conservative_loss(h: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(h) − ε·log σ(−h): cDPO / label smoothing (Mitchell 2023)."""
    return -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def robust_loss(h: Tensor, eps: float) -> Tensor:
    """[−(1−ε)·log σ(h) + ε·log σ(−h)]/(1−2ε): rDPO, unbiased under label-flip rate ε < ½ (Chowdhury 2024, Eq. 8)."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust_loss: eps is a label-flip rate in [0, 0.5), got {eps}")
    return (-(1.0 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)


def soft_label_loss(h: Tensor, p: Tensor | float) -> Tensor:
    """−p·log σ(h) − (1−p)·log σ(−h): cross-entropy with a soft preference p = P(w ≻ l)."""
    return -p * F.logsigmoid(h) - (1.0 - p) * F.logsigmoid(-h)


def smpo_loss(h: Tensor, p: Tensor | float, gain: float = 10.0) -> Tensor:
    """−log σ(g·(2p−1)·h): SmPO-Diffusion's smoothed objective as its authors coded it (g = 10).

    The paper writes the smoothing as a scaled logit; the reference code multiplies the DPO
    logit by 10·(2p − 1) with p from PickScore, which is what this computes.
    """
    return -F.logsigmoid(gain * (2.0 * p - 1.0) * h)


def kto_loss(r: Tensor, desirable: Tensor, z: Tensor | float, lambda_d: float = 1.0,
             lambda_u: float = 1.0) -> Tensor:
    """λ_D(1 − σ(r − z)) for desirable images, λ_U(1 − σ(z − r)) otherwise: Diffusion-KTO (Li et al. 2024)."""
    desirable = desirable.to(torch.bool)
    return torch.where(desirable, lambda_d * (1.0 - torch.sigmoid(r - z)),
                       lambda_u * (1.0 - torch.sigmoid(z - r)))


def _dcg_weights(r: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """ΔDCG_ij and the mask of ordered pairs (gt_i > gt_j); ranks τ come from r without gradient."""
    with torch.no_grad():
        k = r.shape[-1]
        order = torch.argsort(r.detach(), dim=-1, descending=True)
        tau = torch.empty_like(order)
        tau.scatter_(-1, order, torch.arange(1, k + 1, device=r.device).expand_as(order))
        inv_d = 1.0 / torch.log2(1.0 + tau.to(r.dtype))
        psi = (gt.unsqueeze(-1) > gt.unsqueeze(-2)).sum(-1).to(r.dtype)  # images strictly below i
        gain = torch.pow(2.0, psi) - 1.0
        pair = gt.unsqueeze(-1) > gt.unsqueeze(-2)
        w = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (inv_d.unsqueeze(-1) - inv_d.unsqueeze(-2)).abs()
    return w * pair, pair


def ranked_loss(r: Tensor, gt_scores: Tensor) -> Tensor:
    """RankDPO (Karthik et al. 2024, Eq. 7): ΔDCG-weighted Σ_{gt_i>gt_j} −log σ(r_i − r_j) / Σ ΔDCG_ij, per list.

    r, gt_scores: [B, K] -> [B]. Gains G_i = 2^ψ_i − 1 with ψ_i the number of images scored strictly
    below i; discounts 1/log2(1 + τ_i) with τ the 1-based rank under the current r. A list with no
    ordered pair (all tied) contributes 0.
    """
    w, _ = _dcg_weights(r, gt_scores)
    pair_loss = -F.logsigmoid(r.unsqueeze(-1) - r.unsqueeze(-2))
    num = (w * pair_loss).sum((-1, -2))
    den = w.sum((-1, -2))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(num))


def listwise_loss(r: Tensor, target_probs: Tensor) -> Tensor:
    """−Σ_k q_k log softmax(r)_k: Plackett–Luce top-1 cross-entropy with soft targets q (ADPO-style lists)."""
    return -(target_probs * torch.log_softmax(r, dim=-1)).sum(-1)


def adpo_loss(r: Tensor, q: Tensor, tau: float) -> Tensor:
    """KL(q ‖ softmax(r/τ)) per list: anchored DPO (ADPO, arXiv 2510.18913), r = the implicit reward against the anchor.

    r, q: [B, K] -> [B]. The anchor is the reference model r is measured against (fixed: adapters off;
    dynamic: the policy at a round or stage start). With K = 2 and a hard label this is DPO at β/τ.
    """
    entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1)  # 0·log 0 = 0
    return listwise_loss(r / tau, q) - entropy


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def f_link(u: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f′ of the policy/reference ratio as a function of the log-ratio u (f-DPO, Wang et al. 2023, Table 1).

    reverse_kl: u (DPO) · forward_kl: −e^{−u} · js: log σ(u) (= log 2e^u/(1+e^u) − log 2) ·
    alpha (0 < α < 1): −e^{−αu}/α, which tends to reverse KL as α → 0 and is forward KL at α = 1.
    Exponents are capped at 50 so that a far-off u saturates instead of overflowing in bf16.
    """
    if divergence == "reverse_kl":
        return u
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-u, max=50.0))
    if divergence == "js":
        return F.logsigmoid(u)
    if divergence == "alpha":
        return -torch.exp(torch.clamp(-alpha * u, max=50.0)) / alpha
    raise ValueError(f"f-divergence {divergence!r}: expected one of {', '.join(F_DIVERGENCES)}")


def fdpo_loss(r_w: Tensor, r_l: Tensor, divergence: str, alpha: float = 0.5, beta: float = 1.0) -> Tensor:
    """−log σ(β·[f′(u_w) − f′(u_l)]) with u = r/β the per-image log-ratio (f-DPO Eq. 11).

    The diffusion log-ratio exists only up to the ELBO scale, so β here (the log-ratio temperature)
    is chosen apart from Diffusion-DPO's β that scales r; reverse KL gives −log σ(r_w − r_l) for any β.
    """
    return -F.logsigmoid(beta * (f_link(r_w / beta, divergence, alpha) - f_link(r_l / beta, divergence, alpha)))


def gaussian_keep_probs(margins: Tensor, m0: float, sigma: float) -> Tensor:
    """β-DPO's data filter: p_i ∝ exp(−(M_i − M_0)²/(2σ²)), normalised over the batch (Wu et al. 2024, Eq. 7)."""
    logits = -((margins - m0) ** 2) / (2.0 * max(sigma, 1e-12) ** 2)
    return torch.softmax(logits, dim=0)


def dynamic_beta_scale(batch_margin: float, m0: float, alpha: float, floor: float = 0.05) -> float:
    """β_batch/β_0 = 1 + α·(E_batch[M_i] − M_0) (β-DPO Eq. 6), floored so that β stays positive."""
    return max(floor, 1.0 + alpha * (batch_margin - m0))


def ddo_loss(r_real: Tensor, r_fake: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(−log σ(r_real), −α·log σ(−r_fake)): DDO's likelihood-ratio discriminator (Zheng et al. 2025, Eq. 9)."""
    return -F.logsigmoid(r_real), -alpha * F.logsigmoid(-r_fake)


def d3po_loss(logp_w: Tensor, ref_logp_w: Tensor, logp_l: Tensor, ref_logp_l: Tensor, beta: float,
              clip_eps: float) -> Tensor:
    """−log σ(β·(ρ_w − ρ_l)), ρ = clamp(log p_θ − log p_ref, log(1−ε), log(1+ε)), per denoising step (D3PO Eq. 10).

    As in the authors' code the clamp acts on the log-ratio itself, so its gradient is zero
    once a ratio leaves [1−ε, 1+ε].
    """
    lo, hi = math.log(1.0 - clip_eps), math.log(1.0 + clip_eps)
    rho_w = torch.clamp(logp_w - ref_logp_w, lo, hi)
    rho_l = torch.clamp(logp_l - ref_logp_l, lo, hi)
    return -F.logsigmoid(beta * (rho_w - rho_l))


def mapo_loss(err_w: Tensor, err_l: Tensor, beta: float, gamma: float, T: float) -> Tensor:
    """e_w − β·log σ(T·(f(e_w) − f(e_l))), f(e) = γe/(exp(γe) − 1): MaPO, reference-free (Hong et al. 2024)."""
    def f(e: Tensor) -> Tensor:
        ge = gamma * e
        # γe/(e^{γe} − 1) → 1 as e → 0; a safe denominator keeps the unused branch's gradient finite
        small = ge.abs() < 1e-12
        safe = torch.where(small, torch.ones_like(ge), ge)
        return torch.where(small, torch.ones_like(ge), safe / torch.expm1(safe))

    return err_w - beta * F.logsigmoid(T * (f(err_w) - f(err_l)))
