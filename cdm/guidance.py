"""Guidance: steering the base stage toward a requested label y at sampling time.

Classifier guidance (Dhariwal & Nichol 2021, section 4) adds the gradient of a noisy classifier's
log p(y | x_t, t) to each reverse step: the ancestral mean moves by s * Sigma * grad (Alg. 1),
and DDIM moves eps by -sqrt(1 - abar_t) * s * grad (Alg. 2, Eq. 14). `classifier_score` builds the
function s * grad_x log p(y | x_t, t) that the samplers in cdm/diffusion.py take as `score_fn`.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) needs no classifier: one model trained with
label dropout predicts both eps(x_t, y) and eps(x_t, null), and sampling uses
eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null). `classifier_free` wraps a model so that it returns
the guided output; the samplers run it like any model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cdm.diffusion import ScoreFn


@dataclass
class Guidance:
    """How strongly to guide; the labels travel with the samples (cascade.sample_cascade)."""

    cfg_scale: float = 0.0  # w of classifier-free guidance (0: the plain conditional model)
    classifier: torch.nn.Module | None = None  # noisy classifier p(y | x_t, t) at the base size
    classifier_scale: float = 0.0  # s of classifier guidance (0: none)


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Training-time label dropout: each label (B,) becomes the null label with probability p,
    so one network learns eps(x_t, y) and eps(x_t, null) (Ho & Salimans section 3.2)."""
    if p == 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < p
    return torch.where(drop, null_label, y)


def classifier_free(model: Callable, cfg_scale: float, null_label: int) -> Callable:
    """model(x, t, y=..., **cond) -> (1 + w) out(x, y) - w out(x, null), both halves in one batch.
    Valid for eps- and v-prediction alike: at fixed x_t, v = eps / sqrt(abar) - sqrt(1/abar - 1)
    x_t is affine in eps, and the weights (1 + w, -w) sum to one, so mixing v mixes eps exactly."""

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        labels = torch.cat([y, torch.full_like(y, null_label)])  # (2B,)
        out_cond, out_null = model(torch.cat([x, x]), torch.cat([t, t]), y=labels, **both).chunk(2)
        return out_cond + cfg_scale * (out_cond - out_null)

    return guided


def classifier_score(classifier: torch.nn.Module, y: torch.Tensor, scale: float) -> ScoreFn:
    """(x_t, t) -> scale * grad_x log p(y | x_t, t), the classifier's pull toward labels y (B,)."""

    def score(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)  # (B, classes)
            chosen = log_probs[torch.arange(y.shape[0], device=y.device), y].sum()
            return scale * torch.autograd.grad(chosen, x)[0]  # (B, C, H, W)

    return score
