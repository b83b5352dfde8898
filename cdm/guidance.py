"""Guidance: steering the base stage toward a requested label y at sampling time.

Classifier guidance (Dhariwal & Nichol 2021, section 4) adds the gradient of a noisy classifier's
log p(y | x_t, t) to each reverse step: the ancestral mean moves by s * Sigma * grad (Alg. 1),
and DDIM moves eps by -sqrt(1 - abar_t) * s * grad (Alg. 2, Eq. 14). `classifier_score` builds the
function s * grad_x log p(y | x_t, t) that the samplers in cdm/diffusion.py take as `score_fn`.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) needs no classifier: one model trained with
label dropout predicts both eps(x_t, y) and eps(x_t, null), and sampling uses
eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null). `classifier_free` wraps a model so that it returns
the guided output; the samplers run it like any model.

Redrawing: with `redraw` k > 0, base samples that the noisy classifier reads (at t = 0) as another
class than the one asked, or as it with a probability below `redraw_confidence`, are drawn again,
up to k times (`misread`, used by cascade.py). Guidance
alone trades diversity for label accuracy; a redraw touches only the few samples that missed.
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
    cfg_interval: tuple[int, int] | None = None  # CFG only at states lo <= t <= hi (None: all)
    redraw: int = 0  # redraw base samples the classifier reads as another class, up to this often
    redraw_confidence: float = 0.0  # ... and those it reads as asked with a probability below this

    @property
    def redraw_text(self) -> str:
        """The redraw setting as the scripts print it, e.g. "redraw 5 below p 0.9"."""
        confidence = f" below p {self.redraw_confidence}" * bool(self.redraw and self.redraw_confidence)
        return f"redraw {self.redraw}{confidence}"


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Training-time label dropout: each label (B,) becomes the null label with probability p,
    so one network learns eps(x_t, y) and eps(x_t, null) (Ho & Salimans section 3.2)."""
    if p == 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < p
    return torch.where(drop, null_label, y)


def classifier_free(model: Callable, cfg_scale: float, null_label: int,
                    interval: tuple[int, int] | None = None) -> Callable:
    """model(x, t, y=..., **cond) -> (1 + w) out(x, y) - w out(x, null), both halves in one batch.
    Valid for eps- and v-prediction alike: at fixed x_t, v = eps / sqrt(abar) - sqrt(1/abar - 1)
    x_t is affine in eps, and the weights (1 + w, -w) sum to one, so mixing v mixes eps exactly.
    interval (lo, hi): guide only the states lo <= t <= hi, elsewhere the plain conditional model
    (Kynkaanniemi et al. 2024: guidance at the highest noise levels costs diversity, at the
    lowest it does little)."""

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        if interval is not None and not bool(((t >= interval[0]) & (t <= interval[1])).any()):
            return model(x, t, y=y, **cond)
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        labels = torch.cat([y, torch.full_like(y, null_label)])  # (2B,)
        out_cond, out_null = model(torch.cat([x, x]), torch.cat([t, t]), y=labels, **both).chunk(2)
        w = torch.full_like(t, cfg_scale, dtype=out_cond.dtype)  # (B,)
        if interval is not None:
            w = torch.where((t >= interval[0]) & (t <= interval[1]), w, 0)
        return out_cond + w.view(-1, *[1] * (x.ndim - 1)) * (out_cond - out_null)

    return guided


@torch.no_grad()
def misread(classifier: torch.nn.Module, base_images: torch.Tensor, y: torch.Tensor,
            min_confidence: float = 0.0) -> torch.Tensor:
    """(B,) bool: the noisy classifier, at t = 0, reads the clean base-size images (B, C, h, w)
    as another class than y (B,), or as y with a probability below min_confidence."""
    t = torch.zeros(len(y), dtype=torch.long, device=base_images.device)
    probs = classifier(base_images, t).float().softmax(dim=1)  # (B, classes)
    p_asked = probs.gather(1, y.view(-1, 1)).squeeze(1)  # (B,)
    return (probs.argmax(dim=1) != y) | (p_asked < min_confidence)


def classifier_score(classifier: torch.nn.Module, y: torch.Tensor, scale: float) -> ScoreFn:
    """(x_t, t) -> scale * grad_x log p(y | x_t, t), the classifier's pull toward labels y (B,)."""

    def score(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)  # (B, classes)
            chosen = log_probs[torch.arange(y.shape[0], device=y.device), y].sum()
            return scale * torch.autograd.grad(chosen, x)[0]  # (B, C, H, W)

    return score
