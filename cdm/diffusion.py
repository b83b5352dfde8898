"""Gaussian diffusion: schedules, forward process, posterior, loss and samplers.

Timestep convention, used everywhere in cdm: `t` is an integer state index in [0, T-1], a
LongTensor of shape (B,). State t is the image after t+1 forward steps, so
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with abar_t = prod_{i<=t} (1 - beta_i).
The index -1 stands for the clean image x_0 (abar = 1); samplers move from t to an earlier state
t_prev >= -1. The diffusion object holds no weights: the model is passed in and the
conditioning travels as a dict `cond`, forwarded as `model(x_t, t, **cond)` without being opened.

Papers: DDPM = Ho et al. 2020; DDIM = Song et al. 2021; cosine schedule = Nichol & Dhariwal
2021; v-prediction = Salimans & Ho 2022; DPM-Solver++ = Lu et al. 2022 ("DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models").
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from cdm.config import DiffusionConfig, SamplerConfig


def beta_schedule(name: str, timesteps: int, log_snr_shift: float = 0.0) -> torch.Tensor:
    """Betas in float64. linear: DDPM section 4 (1e-4 .. 0.02 scaled to T steps);
    cosine: Nichol & Dhariwal Eq. 17, abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008.
    log_snr_shift: added to log SNR(t) = log(abar_t / (1 - abar_t)) at every t (the shifted
    schedules of Hoogeboom et al. 2023, Sec. 3.1, simple diffusion): > 0 moves every state toward
    the clean image, so more of the T states, and of a sampler's steps, fall at low noise."""
    if name == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif name == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown beta schedule {name!r}")
    if log_snr_shift == 0:
        return betas
    alpha_bar = torch.sigmoid(torch.logit(torch.cumprod(1 - betas, dim=0)) + log_snr_shift)  # (T,)
    return 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] for a batch of indices t (B,), shaped (B, 1, ..., 1) to broadcast over ndim dims."""
    return table[t].view(-1, *([1] * (ndim - 1)))


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn from `generator` on the generator's own
    device and moved to like's (they differ when the two stages sit on two GPUs)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device).to(like.device)


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> s * grad log p(y|x_t)


class Prediction(NamedTuple):
    eps: torch.Tensor  # predicted noise, (B, C, H, W)
    x0: torch.Tensor  # predicted clean image, (B, C, H, W)


class GaussianDiffusion:
    def __init__(self, cfg: DiffusionConfig, device: torch.device | str = "cpu"):
        self.num_timesteps = cfg.timesteps
        self.prediction = cfg.prediction
        self.loss_weight, self.min_snr_gamma = cfg.loss_weight, cfg.min_snr_gamma
        self.noise_distribution, self.p_mean, self.p_std = cfg.noise_distribution, cfg.p_mean, cfg.p_std
        self.stratified = cfg.stratified
        betas = beta_schedule(cfg.schedule, cfg.timesteps, cfg.log_snr_shift)  # beta_t, float64
        alpha_bar = torch.cumprod(1 - betas, dim=0)  # \bar\alpha_t

        def table(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=torch.float32)

        # forward process q(x_t | x_0), DDPM Eq. 4
        self.betas = table(betas)  # \beta_t
        self.alpha_bar = table(alpha_bar)  # \bar\alpha_t
        # abar with the clean state prepended: alpha_bar_padded[t + 1] = abar_t, abar_{-1} = 1.
        # Kept in float64: samplers form 1 - abar_t / abar_prev, which float32 rounds badly.
        self.alpha_bar_padded = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar]).to(device)
        self.sqrt_alpha_bar = table(alpha_bar.sqrt())  # \sqrt{\bar\alpha_t}
        self.sqrt_one_minus_alpha_bar = table((1 - alpha_bar).sqrt())  # \sqrt{1-\bar\alpha_t}
        self.snr = table(alpha_bar / (1 - alpha_bar))  # SNR(t) = abar_t / (1 - abar_t)
        # EDM's noise level of state t (Karras et al. 2022, Table 1, VP: x_t / sqrt(abar_t) = x_0 +
        # sigma_t n), rising with t; its log, to map a drawn ln(sigma) to a state
        self.log_sigma = table(0.5 * torch.log((1 - alpha_bar) / alpha_bar))

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), DDPM Eq. 4.
        x0, noise: (B, C, H, W); t: (B,) in [0, T-1]."""
        return (extract(self.sqrt_alpha_bar, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise)

    def abar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """\\bar\\alpha_t for t in [-1, T-1] (abar_{-1} = 1: the clean image), float64, shaped to
        broadcast; callers cast the coefficients they form to float32."""
        return extract(self.alpha_bar_padded, t + 1, ndim)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    t_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t_prev} | x_t, x_0), DDPM Eq. 6-7, for any earlier state
        t_prev < t (t_prev = t - 1 is the usual one-step posterior; larger gaps are the respaced
        chain of Nichol & Dhariwal section 4). With a = abar_t / abar_prev, b = 1 - a:
        mean = sqrt(abar_prev) b / (1 - abar_t) x_0 + sqrt(a) (1 - abar_prev) / (1 - abar_t) x_t,
        var = b (1 - abar_prev) / (1 - abar_t)."""
        abar_t, abar_prev = self.abar(t, x_t.ndim), self.abar(t_prev, x_t.ndim)
        alpha = abar_t / abar_prev  # \alpha_t over the gap
        beta = 1 - alpha  # \beta_t over the gap
        coef_x0 = (abar_prev.sqrt() * beta / (1 - abar_t)).float()
        coef_xt = (alpha.sqrt() * (1 - abar_prev) / (1 - abar_t)).float()
        mean = coef_x0 * x0 + coef_xt * x_t  # \tilde\mu_t, Eq. 7
        var = (beta * (1 - abar_prev) / (1 - abar_t)).float()  # \tilde\beta_t, Eq. 7
        return mean, var

    # ------------------------------------------------------------------ parametrisations

    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), DDPM Eq. 4 solved for x_0."""
        return (x_t - extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim) * eps) \
            / extract(self.sqrt_alpha_bar, t, x_t.ndim)

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the inverse of the above."""
        return (x_t - extract(self.sqrt_alpha_bar, t, x_t.ndim) * x0) \
            / extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim)

    def v_target(self, x0, t, eps):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022 section 4."""
        return extract(self.sqrt_alpha_bar, t, x0.ndim) * eps \
            - extract(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * x0

    def predict_x0_from_v(self, x_t, t, v):
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return extract(self.sqrt_alpha_bar, t, x_t.ndim) * x_t \
            - extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim) * v

    def predict_x0(self, x_t, t, out):
        """The x0 estimate the model output `out` (eps or v, as trained) stands for."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, out)
        return self.predict_x0_from_v(x_t, t, out)

    def model_predictions(self, model: Callable, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                          clip_x0: bool, score_fn: ScoreFn | None = None) -> Prediction:
        """Run the model once and express its output as (eps, x0). With score_fn (classifier
        guidance in eps form, Dhariwal & Nichol Alg. 2 / Eq. 14) eps becomes
        eps - sqrt(1 - abar_t) * score_fn(x_t, t). With clip_x0 the x0 estimate is clamped to
        [-1, 1] and eps recomputed to match it."""
        out = model(x_t, t, **cond).float()  # (B, C, H, W)
        x0 = self.predict_x0(x_t, t, out)
        eps = out if self.prediction == "eps" else self.predict_eps_from_x0(x_t, t, x0)
        if score_fn is not None:
            eps = eps - extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim) * score_fn(x_t, t)
            x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return Prediction(eps, x0)

    # ------------------------------------------------------------------ training

    def training_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch,) states t to train on, drawn with `generator` on its device. uniform: t in
        [0, T-1] (DDPM Alg. 1). lognormal: EDM's noise distribution (Karras et al. 2022, Sec. 5,
        Table 1), ln(sigma) ~ N(P_mean, P_std^2), each draw taken to the first state whose sigma_t
        reaches it (the last state past sigma_{T-1}): with P_mean = -1.2 the training centres on
        sigma = 0.3 (t near 180 of the cosine schedule's 1000) instead of spreading evenly over t.
        stratified: the batch's quantiles u_i = (u_0 + i / batch) mod 1 share one uniform u_0 (the
        low-discrepancy sampler of Variational Diffusion Models, Kingma et al. 2021), so each
        1/batch-th of the distribution gets one state: the same marginal, less noise per batch."""
        device, uniform = generator.device, self.noise_distribution == "uniform"
        if self.stratified:
            u = (torch.rand(1, generator=generator, device=device)
                 + torch.arange(batch, device=device) / batch) % 1  # (batch,) in [0, 1)
            if uniform:
                return (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
            log_sigma = self.p_mean + self.p_std * torch.special.ndtri(u.clamp(min=1e-7))  # inverse normal CDF
        elif uniform:
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
        else:
            log_sigma = self.p_mean + self.p_std * torch.randn(batch, generator=generator, device=device)
        t = torch.searchsorted(self.log_sigma.to(log_sigma.device), log_sigma)
        return t.clamp(max=self.num_timesteps - 1)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weight of each example's eps or v loss. Min-SNR-gamma (Hang et al. 2023, Eq. 3-4)
        weights the x0 error by min(SNR, gamma); since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
        and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, that is min(SNR, gamma) / SNR for eps
        and min(SNR, gamma) / (SNR + 1) for v: the near-clean states, which need little model
        capacity, stop dominating the gradient."""
        if self.loss_weight == "uniform":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr[t]  # (B,)
        return snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)

    def training_loss(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, cond: dict,
                      noise: torch.Tensor, self_condition: bool = False) -> torch.Tensor:
        """Per-example loss (B,): DDPM Alg. 1 / Eq. 14, || target - model(x_t, t) ||^2 averaged
        over pixels, with target eps or v, times the timestep's loss weight.
        self_condition (the caller's coin, heads half the time): first estimate x0 without the
        gradient and give that estimate to the trained pass as x_self (Chen et al. 2022, Alg. 1);
        tails, x_self stays zeros, so the model also learns the first sampling step."""
        x_t = self.q_sample(x0, t, noise)
        target = noise if self.prediction == "eps" else self.v_target(x0, t, noise)
        if self_condition:
            with torch.no_grad():
                cond = {**cond, "x_self": self.predict_x0(x_t, t, model(x_t, t, **cond).float())}
        out = model(x_t, t, **cond)
        assert out.shape == target.shape, f"model output {tuple(out.shape)} != {tuple(target.shape)}"
        mse = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return self.loss_weights(t) * mse

    # ------------------------------------------------------------------ sampling

    def timesteps(self, steps: int, end: int = -1, spacing: str = "uniform") -> list[int]:
        """`steps`+1 descending states from T-1 down to `end` (-1 = clean); a sampler evaluates
        the model at all but the last and steps from each to the next. uniform: evenly spaced;
        quadratic: at end + (T-1-end) (i/steps)^2 (Song et al. 2021, appendix D.2), denser near
        the clean end, so the last call, whose x0 estimate is the output, sees less noise."""
        steps = max(1, min(steps, self.num_timesteps - 1 - end))
        fraction = torch.linspace(1, 0, steps + 1, dtype=torch.float64)  # (steps + 1,) from T-1 to end
        if spacing == "quadratic":
            fraction = fraction ** 2
        points = end + (self.num_timesteps - 1 - end) * fraction
        return sorted({int(p) for p in points.round()}, reverse=True)

    def p_sample(self, model, x_t, t, t_prev, cond, clip_x0, generator=None, score_fn=None):
        """One ancestral step x_{t_prev} ~ p(x_{t_prev} | x_t) = q(x_{t_prev} | x_t, x0_hat),
        DDPM Alg. 2 with the posterior variance; no noise is added on the step to x_0.
        With score_fn, classifier guidance moves the mean to mu + Sigma * score_fn(x_t, t)
        (Dhariwal & Nichol Alg. 1; the scale s is inside score_fn)."""
        pred = self.model_predictions(model, x_t, t, cond, clip_x0)
        mean, var = self.q_posterior(pred.x0, x_t, t, t_prev)
        if score_fn is not None:
            mean = mean + var * score_fn(x_t, t)
        return mean + var.sqrt() * gaussian_noise(x_t, generator)  # var is 0 where t_prev = -1

    def ddim_step(self, model, x_t, t, t_prev, cond, clip_x0, eta, generator=None, score_fn=None):
        """One DDIM step, Song et al. Eq. 12: x_prev = sqrt(abar_prev) x0_hat
        + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, sigma from Eq. 16 scaled by eta;
        score_fn guides eps_hat (see model_predictions)."""
        pred = self.model_predictions(model, x_t, t, cond, clip_x0, score_fn)
        abar_t, abar_prev = self.abar(t, x_t.ndim), self.abar(t_prev, x_t.ndim)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()  # Eq. 16
        coef_eps = (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt().float() * pred.x0 + coef_eps.float() * pred.eps
        sigma = sigma.float()
        if eta > 0:
            x_prev = x_prev + sigma * gaussian_noise(x_t, generator)
        return x_prev

    def dpm_solver_step(self, model, x_t, t, t_prev, cond, clip_x0, history, score_fn=None):
        """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2), a second-order multistep solver
        of the diffusion ODE in x0-prediction form. With lambda = log(alpha / sigma),
        alpha = sqrt(abar), sigma = sqrt(1 - abar), h = lambda_prev - lambda_t:
        x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^-h - 1) D, where D is x0_hat on the
        first step and (1 + 1/2r) x0_hat - 1/2r x0_hat_before, r = h_before / h, after it.
        `history` is (x0_hat, h) of the step before, or None; returns (x_prev, history). The
        step to the clean image (sigma = 0) is x0_hat itself (first order, as is usual)."""
        pred = self.model_predictions(model, x_t, t, cond, clip_x0, score_fn)
        if bool((t_prev < 0).all()):
            return pred.x0, None
        abar_t, abar_prev = self.abar(t, x_t.ndim), self.abar(t_prev, x_t.ndim)  # float64

        def half_log_snr(abar):  # lambda = log(alpha / sigma)
            return 0.5 * torch.log(abar / (1 - abar))

        h = half_log_snr(abar_prev) - half_log_snr(abar_t)
        d = pred.x0
        if history is not None:
            x0_before, h_before = history
            r = h_before / h
            d = ((1 + 1 / (2 * r)).float() * pred.x0 - (1 / (2 * r)).float() * x0_before)
        x_prev = (((1 - abar_prev) / (1 - abar_t)).sqrt().float() * x_t
                  - (abar_prev.sqrt() * torch.expm1(-h)).float() * d)
        return x_prev, (pred.x0, h)

    def self_conditioned(self, model: Callable) -> Callable:
        """A self-conditioned model as sampling runs it (Chen et al. 2022, Alg. 2): each call
        gets as x_self the x0 estimate of the call before (none on the first); one wrapper per
        chain of samples."""
        previous = {}

        def call(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
            out = model(x_t, t, **cond, **previous)
            previous["x_self"] = self.predict_x0(x_t, t, out.float())  # (B, C, H, W)
            return out

        return call

    @torch.no_grad()  # not inference_mode: classifier guidance differentiates through x_t
    def sample(self, model, noise: torch.Tensor, cond: dict, sampler: SamplerConfig,
               end: int = -1, generator: torch.Generator | None = None,
               score_fn: ScoreFn | None = None) -> torch.Tensor:
        """Run the reverse process from x_{T-1} = noise (B, C, H, W) down to state `end`
        (-1: the clean image; end >= 0 stops early, as truncated conditioning augmentation
        needs). `ddpm` with steps = T - 1 - end is the full ancestral chain. score_fn, when
        given, is classifier guidance (see guidance.py)."""
        x, history = noise, None
        points = self.timesteps(sampler.steps, end, sampler.spacing)
        batch = noise.shape[0]
        for t, t_prev in zip(points[:-1], points[1:]):
            t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
            prev_batch = torch.full((batch,), t_prev, device=x.device, dtype=torch.long)
            if sampler.name == "ddpm":
                x = self.p_sample(model, x, t_batch, prev_batch, cond, sampler.clip_x0, generator,
                                  score_fn)
            elif sampler.name == "dpm++2m":
                x, history = self.dpm_solver_step(model, x, t_batch, prev_batch, cond,
                                                  sampler.clip_x0, history, score_fn)
            else:
                x = self.ddim_step(model, x, t_batch, prev_batch, cond, sampler.clip_x0,
                                   sampler.eta, generator, score_fn)
        return x
