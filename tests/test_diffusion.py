import pytest
import torch

from cdm.config import DiffusionConfig, SamplerConfig
from cdm.diffusion import GaussianDiffusion, beta_schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_endpoints_and_monotonicity(schedule):
    betas = beta_schedule(schedule, 1000)
    assert betas.shape == (1000,)
    assert (betas > 0).all() and (betas < 1).all()
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    abar = d.alpha_bar
    assert (abar[1:] < abar[:-1]).all(), "abar must fall strictly"
    assert abar[0] > 0.99, "the first step barely noises"
    assert abar[-1] < 1e-4, "the last step is (almost) pure noise"
    assert d.abar(torch.tensor([-1]), 1).item() == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("shift", [-1.5, 1.3862944])
def test_shifted_schedule_moves_log_snr_by_the_shift_at_every_state(schedule, shift):
    plain = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    shifted = GaussianDiffusion(DiffusionConfig(schedule=schedule, log_snr_shift=shift))
    assert ((shifted.betas > 0) & (shifted.betas < 1)).all()
    assert (shifted.alpha_bar[1:] < shifted.alpha_bar[:-1]).all(), "abar must still fall strictly"
    moved = torch.log(shifted.snr.double()) - torch.log(plain.snr.double())  # (T,)
    assert torch.allclose(moved, torch.full_like(moved, shift), atol=1e-3)
    # the sampler's grid is the same states, so a shift toward the clean image lowers the noise
    # that the last call of a few-step sampler sees
    last = plain.timesteps(3, spacing="quadratic")[-2]
    assert (shifted.sqrt_one_minus_alpha_bar[last] < plain.sqrt_one_minus_alpha_bar[last]) == (shift > 0)


def test_linear_schedule_matches_ddpm():
    betas = beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_q_sample_statistics():
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    for step in (10, 300, 900):
        t = torch.full((20000,), step)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = d.q_sample(x0, t, noise)
        abar = d.alpha_bar[step].item()
        assert x_t.mean().item() == pytest.approx(abar ** 0.5 * 0.7, abs=0.02)
        assert x_t.var().item() == pytest.approx(1 - abar, abs=0.03)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parametrisations_round_trip(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(6, 1, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 200, 500, 800, 990])
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-3, rtol=0)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, d.v_target(x0, t, eps)), x0, atol=1e-4, rtol=0)

    # a model that outputs the exact target gives back x0 and eps through model_predictions
    def oracle(x, t_, **cond):
        return eps if prediction == "eps" else d.v_target(x0, t_, eps)

    pred = d.model_predictions(oracle, x_t, t, {}, clip_x0=False)
    torch.testing.assert_close(pred.x0, x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(pred.eps, eps, atol=1e-3, rtol=0)


def test_uniform_training_timesteps_draw_what_randint_draws():
    """The default keeps every earlier run's draws (and so resumed runs) unchanged."""
    d = GaussianDiffusion(DiffusionConfig())
    t = d.training_timesteps(64, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lognormal_training_timesteps_follow_edm_noise_distribution(schedule):
    """Karras et al. 2022: ln(sigma_t) of the drawn states is N(P_mean, P_std^2), up to the
    rounding to the next state; each draw lands on the first state whose sigma reaches it."""
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule, noise_distribution="lognormal", p_mean=-1.2, p_std=1.2))
    t = d.training_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    log_sigma = d.log_sigma[t]  # (N,)
    inside = (t > 0) & (t < 999)  # the two ends also take the draws beyond them
    assert abs(log_sigma.median().item() + 1.2) < 0.05
    assert abs((log_sigma[inside] <= 0.0).float().mean().item() - 0.841) < 0.02  # P(z <= 1)
    # first state at or above the draw: sigma_{t-1} is below what the draw needed
    draws = -1.2 + 1.2 * torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert ((d.log_sigma[t] >= draws) | (t == 999)).all()
    assert ((d.log_sigma[(t - 1).clamp(min=0)] < draws) | (t == 0)).all()
    wider = GaussianDiffusion(DiffusionConfig(schedule=schedule, noise_distribution="lognormal", p_std=2.0))
    assert (wider.training_timesteps(200_000, torch.Generator().manual_seed(0)) > 900).float().mean() > 2 * (t > 900).float().mean()


@pytest.mark.parametrize("noise_distribution", ["uniform", "lognormal"])
def test_stratified_training_timesteps_keep_the_marginal_and_steady_each_batch(noise_distribution):
    """Kingma et al. 2021's low-discrepancy sampler: one state in each 1/B-th of the distribution
    (for uniform t with B = 100 and T = 1000: exactly one t in each block of 10), the same pooled
    distribution as independent draws, and a batch mean that varies far less from batch to batch."""
    def draws(stratified: bool, seed: int) -> torch.Tensor:  # (200, 100): 200 batches of 100
        d = GaussianDiffusion(DiffusionConfig(noise_distribution=noise_distribution, stratified=stratified))
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([d.training_timesteps(100, gen) for _ in range(200)])

    iid, strat = draws(False, 0), draws(True, 0)
    if noise_distribution == "uniform":
        assert all(torch.equal(torch.sort(row // 10).values, torch.arange(100)) for row in strat)
    assert not torch.equal(strat[0], strat[1])  # u_0 is drawn anew for every batch
    pooled_iid, pooled_strat = iid.flatten().float(), strat.flatten().float()
    for q in (0.1, 0.5, 0.9):  # the same marginal: quantiles of 20,000 draws agree
        assert abs(pooled_iid.quantile(q) - pooled_strat.quantile(q)) < 25
    assert strat.float().mean(dim=1).std() < 0.2 * iid.float().mean(dim=1).std()
    assert torch.equal(draws(True, 0), strat)  # reproducible from the generator


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_the_x0_error_weighted_by_min_snr_gamma(prediction):
    """Hang et al. 2023: whatever the model predicts, the min_snr loss of an output equals
    min(SNR_t, gamma) * ||x0 - x0_hat||^2 of the x0 that output implies."""
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction, loss_weight="min_snr", min_snr_gamma=5.0))
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 1, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(5, 1, 4, 4, generator=gen)
    out = torch.randn(5, 1, 4, 4, generator=gen)  # an arbitrary, wrong prediction
    t = torch.tensor([5, 100, 400, 700, 950])  # SNR from far above gamma to far below it
    loss = d.training_loss(lambda x, t_: out, x0, t, {}, eps)
    x_t = d.q_sample(x0, t, eps)
    x0_hat = d.predict_x0_from_eps(x_t, t, out) if prediction == "eps" else d.predict_x0_from_v(x_t, t, out)
    snr = d.alpha_bar[t] / (1 - d.alpha_bar[t])
    expected = snr.clamp(max=5.0) * (x0 - x0_hat).pow(2).mean(dim=(1, 2, 3))
    assert snr.max() > 5 > snr.min()
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-5)
    uniform = GaussianDiffusion(DiffusionConfig(prediction=prediction)).training_loss(lambda x, t_: out, x0, t, {}, eps)
    assert not torch.allclose(loss, uniform, rtol=0.1)


def test_posterior_matches_closed_form():
    """One-step q(x_{t-1} | x_t, x_0) against DDPM Eq. 7 written with beta_t directly."""
    d = GaussianDiffusion(DiffusionConfig(schedule="linear"))
    gen = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(4, 1, 3, 3, generator=gen), torch.randn(4, 1, 3, 3, generator=gen)
    t = torch.tensor([1, 50, 400, 999])
    mean, var = d.q_posterior(x0, x_t, t, t - 1)
    betas = beta_schedule("linear", 1000)
    abar = torch.cumprod(1 - betas, 0)
    for i, step in enumerate(t.tolist()):
        b, a, ab, ab_prev = betas[step], 1 - betas[step], abar[step], abar[step - 1]
        want_mean = ab_prev.sqrt() * b / (1 - ab) * x0[i] + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t[i]
        torch.testing.assert_close(mean[i], want_mean.float(), atol=1e-5, rtol=1e-4)
        assert var[i].item() == pytest.approx(((1 - ab_prev) / (1 - ab) * b).item(), rel=1e-4)
    # to the clean image: the posterior is x0 itself, with no variance
    mean0, var0 = d.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long), torch.full((4,), -1))
    torch.testing.assert_close(mean0, x0)
    assert (var0 == 0).all()


def test_ddim_eta_one_equals_ancestral_step():
    """DDIM with eta = 1 uses the posterior variance (Song et al. Eq. 16), so with the same noise
    it takes exactly the DDPM step."""
    d = GaussianDiffusion(DiffusionConfig())
    x_t = torch.randn(3, 1, 4, 4)
    x0_hat = torch.rand(3, 1, 4, 4) * 2 - 1

    def model(x, t_, **cond):
        return d.v_target(x0_hat, t_, d.predict_eps_from_x0(x, t_, x0_hat))

    t, t_prev = torch.tensor([500, 20, 999]), torch.tensor([499, 10, 900])
    a = d.p_sample(model, x_t, t, t_prev, {}, False, torch.Generator().manual_seed(5))
    b = d.ddim_step(model, x_t, t, t_prev, {}, False, 1.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_timesteps_sequence():
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000))
    full = d.timesteps(1000)
    assert full == list(range(999, -2, -1))
    short = d.timesteps(10, end=49)
    assert short[0] == 999 and short[-1] == 49 and len(short) == 11
    assert all(a > b for a, b in zip(short, short[1:]))


def test_quadratic_spacing_is_denser_near_the_clean_end():
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000))
    uniform, quadratic = d.timesteps(3), d.timesteps(3, spacing="quadratic")
    assert uniform == [999, 666, 332, -1]
    assert quadratic[0] == 999 and quadratic[-1] == -1 and len(quadratic) == 4
    assert quadratic[-2] < uniform[-2] / 2  # the last model call (the output's x0) sees less noise
    assert d.timesteps(10, end=49, spacing="quadratic")[-1] == 49  # a truncated chain still stops at s - 1


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
def test_full_loop_with_zero_model(name):
    d = GaussianDiffusion(DiffusionConfig(timesteps=50))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = d.sample(lambda x, t, **c: torch.zeros_like(x), noise, {}, SamplerConfig(name=name, steps=49),
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0  # a zero v-prediction gives x0 estimates in [-1, 1] after clipping


def test_dpm_solver_is_second_order_on_the_ode():
    """Data N(mu, s^2) per pixel has an exact denoiser E[x0 | x_t], and DDIM with 999 steps then
    solves the probability-flow ODE almost exactly. Doubling the steps must shrink DDIM's error
    about 2x (first order) and DPM-Solver++(2M)'s about 4x (second order), and the solver's
    output must have the data's law."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000, prediction="eps"))
    mu, s = 0.3, 0.2

    def oracle(x, t, **cond):  # eps_hat from the exact posterior mean of x0
        a = d.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        sigma = d.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        x0 = mu + a * s ** 2 / (a ** 2 * s ** 2 + sigma ** 2) * (x - a * mu)
        return (x - a * x0) / sigma

    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def error(name, steps):
        out = d.sample(oracle, noise, {}, SamplerConfig(name=name, steps=steps, clip_x0=False))
        return (out - reference).abs().mean().item(), out

    reference = d.sample(oracle, noise, {}, SamplerConfig(name="ddim", steps=999, clip_x0=False))
    ddim_20, ddim_40 = error("ddim", 20)[0], error("ddim", 40)[0]
    (dpm_20, _), (dpm_40, out) = error("dpm++2m", 20), error("dpm++2m", 40)
    assert 1.6 < ddim_20 / ddim_40 < 2.5
    assert dpm_20 / dpm_40 > 3.5 and dpm_40 < 0.3 * ddim_40
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.02


class Recorder:
    """A stand-in model: random outputs, and a log of each call's x_t, t, x_self, whether the
    gradient was on, and its output."""

    def __init__(self):
        self.calls, self.gen = [], torch.Generator().manual_seed(0)

    def __call__(self, x, t, x_self=None, **cond):
        out = torch.randn(x.shape, generator=self.gen)
        self.calls.append((x, t, x_self, torch.is_grad_enabled(), out))
        return out


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
def test_self_conditioned_sampling_feeds_each_call_the_previous_x0(name):
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    model = Recorder()
    d.sample(d.self_conditioned(model), torch.randn(2, 1, 4, 4), {}, SamplerConfig(name=name, steps=5),
             generator=torch.Generator().manual_seed(1))
    assert len(model.calls) == 5 and model.calls[0][2] is None
    for (x, t, _, _, out), (_, _, x_self, _, _) in zip(model.calls, model.calls[1:]):
        torch.testing.assert_close(x_self, d.predict_x0(x, t, out))


@pytest.mark.parametrize("heads", [True, False])
def test_self_condition_training_gives_a_detached_estimate_to_the_trained_pass(heads):
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    model, x0 = Recorder(), torch.rand(3, 1, 4, 4) * 2 - 1
    t, noise = torch.tensor([5, 50, 95]), torch.randn(3, 1, 4, 4)
    d.training_loss(model, x0, t, {}, noise, self_condition=heads)
    if not heads:
        assert [c[2] for c in model.calls] == [None]
        return
    (x_t, _, first_self, first_grad, first_out), (_, _, x_self, grad, _) = model.calls
    assert first_self is None and not first_grad and grad
    torch.testing.assert_close(x_t, d.q_sample(x0, t, noise))
    torch.testing.assert_close(x_self, d.predict_x0(x_t, t, first_out))
