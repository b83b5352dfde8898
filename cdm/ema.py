"""Averages of the weights along a training run.

The sampling EMA (`ema_decay`): ema <- decay * ema + (1 - decay) * model after every step, a
fixed decay with a short warm-up. Its length in steps is fixed, so its length relative to the
run changes with train.steps.

Power-function EMAs (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3 and appendix C) average the raw weights theta_tau of steps
tau = 1..t with weights proportional to tau^gamma, so their length is a fixed fraction of the run:

    p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on [0, t]     (the profile, eq. 3)
    ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1)
    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))             (its std / t, eq. 4)

Every power EMA is a linear function of the same raw weights. Snapshots of a few of them, saved
every train.save_every steps (stages.N.optim.posthoc_ema_std), are mixed by least squares into
the profile of any other sigma_rel at any saved step (`posthoc_weights`), so the averaging length
is chosen after training: python -m cdm.checkpoint posthoc RUN/checkpoint.pt OUT.pt --std 0.05.
"""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def ema_decay(step: int, decay: float) -> float:
    """The sampling EMA's decay with warm-up, min(decay, (1 + step) / (10 + step)): early on the
    average forgets the random initial weights quickly, which matters in short runs."""
    return min(decay, (1 + step) / (10 + step))


def exponent(std: float) -> float:
    """gamma of the power-function EMA with relative std sigma_rel: eq. 4 squared and inverted,
    (gamma + 2)^2 (gamma + 3) = (gamma + 1) / sigma_rel^2, a cubic whose largest real root it is."""
    s = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def relative_std(gamma: float) -> float:
    """sigma_rel of the power-function EMA with exponent gamma (eq. 4)."""
    return (gamma + 1) ** 0.5 / ((gamma + 2) * (gamma + 3) ** 0.5)


def power_decay(step: int, gamma: float) -> float:
    """beta_t of the update after `step` earlier steps (t = step + 1): (1 - 1/t)^(gamma + 1),
    0 at the first step, which copies the weights."""
    return (1.0 - 1.0 / (step + 1)) ** (gamma + 1)


def profile_overlap(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor,
                    gamma_b: torch.Tensor) -> torch.Tensor:
    """<p_a, p_b> = integral of p_{gamma_a,t_a}(tau) p_{gamma_b,t_b}(tau) d tau (broadcast).
    With m = min(t_a, t_b) it is (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)),
    written with the ratio m / max(t_a, t_b) < 1 so that large gammas do not overflow."""
    shorter, longer = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_longer = torch.where(t_a <= t_b, gamma_b, gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * longer)
            * (shorter / longer) ** gamma_longer)


def profile_products(steps: list[int], stds: list[float], target_step: int, target_std: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For K snapshots (the EMA with relative std stds[k] at steps[k]) and a target profile:
    the Gram matrix A_jk = <p_j, p_k> (K, K), b_j = <p_j, p_target> (K,) and <p_target, p_target>."""
    t = torch.tensor(steps, dtype=torch.float64)  # (K,)
    gamma = torch.tensor([exponent(s) for s in stds], dtype=torch.float64)  # (K,)
    t_out = torch.tensor(float(target_step), dtype=torch.float64)
    gamma_out = torch.tensor(exponent(target_std), dtype=torch.float64)
    gram = profile_overlap(t[:, None], gamma[:, None], t[None, :], gamma[None, :])  # (K, K)
    return gram, profile_overlap(t, gamma, t_out, gamma_out), profile_overlap(t_out, gamma_out, t_out, gamma_out)


def posthoc_weights(steps: list[int], stds: list[float], target_step: int, target_std: float) -> torch.Tensor:
    """Coefficients x (K,) of K snapshots whose mix sum_k x_k p_k is closest in L2 to the target
    profile (appendix C.3): the least-squares solution of A x = b, rescaled to sum to 1 so that
    the mix is an average. Snapshots after target_step cannot help and should be left out."""
    gram, target, _ = profile_products(steps, stds, target_step, target_std)
    x = torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]  # (K,)
    return x / x.sum()


def profile_error(steps: list[int], stds: list[float], target_step: int, target_std: float,
                  weights: torch.Tensor) -> float:
    """||sum_k x_k p_k - p_target|| / ||p_target||: how faithful a mix is (0 = exact)."""
    gram, target, norm2 = profile_products(steps, stds, target_step, target_std)
    x = weights.to(torch.float64)
    residual2 = x @ gram @ x - 2 * x @ target + norm2
    return float(residual2.clamp(min=0).sqrt() / norm2.sqrt())


class PowerEMA:
    """One power-function EMA of a stage's weights, tracked for post-hoc reconstruction."""

    def __init__(self, std: float, average: torch.nn.Module):
        self.std, self.gamma, self.average = std, exponent(std), average

    @property
    def key(self) -> str:
        """Its name in checkpoints and snapshots, e.g. '0.05'."""
        return f"{self.std:g}"

    def update(self, model: torch.nn.Module, step: int) -> None:
        ema_update(self.average, model, power_decay(step, self.gamma))
