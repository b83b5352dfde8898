"""Weight averages: the sampling EMA's warm-up, power-function EMAs and their post-hoc mixes."""
import pytest
import torch

from cdm.checkpoint import SNAPSHOT_DIR, CheckpointError, combine, posthoc
from cdm.config import load_config
from cdm.ema import PowerEMA, ema_decay, exponent, posthoc_weights, profile_error, relative_std
from cdm.errors import UserError
from cdm.train import train
from conftest import ROOT, assert_one_line_error, run_script


def test_ema_decay_warms_up():
    assert ema_decay(0, 0.9) == pytest.approx(0.1)
    assert ema_decay(10, 0.9) == pytest.approx(11 / 20)
    assert ema_decay(10_000, 0.9) == pytest.approx(0.9)


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_exponent_inverts_the_relative_std(std):
    gamma = exponent(std)
    assert gamma >= 0
    assert relative_std(gamma) == pytest.approx(std, rel=1e-9)


def tracked(trajectory: torch.Tensor, stds: list[float], every: int) -> tuple[dict, list]:
    """Run PowerEMAs of `stds` over a trajectory (T, D) of weights; returns the final averages
    {std: (D,)} and snapshots [(step, std, (D,))] every `every` steps."""
    model = torch.nn.Linear(trajectory.shape[1], 1, bias=False)
    averages = [PowerEMA(std, torch.nn.Linear(trajectory.shape[1], 1, bias=False)) for std in stds]
    snapshots = []
    for step, weights in enumerate(trajectory):
        with torch.no_grad():
            model.weight.copy_(weights)
        for average in averages:
            average.update(model, step)
        if (step + 1) % every == 0:
            snapshots += [(step + 1, a.std, a.average.weight[0].detach().clone()) for a in averages]
    return {a.std: a.average.weight[0].detach().clone() for a in averages}, snapshots


def test_power_ema_weighs_step_tau_by_tau_to_the_gamma():
    """The discrete update's weight of step tau is (1 - (1 - 1/tau)^(g+1)) (tau/T)^(g+1), which
    is close to the profile (g + 1) tau^g / T^(g+1) of eq. 3."""
    T, std = 400, 0.1
    final, _ = tracked(torch.eye(T, dtype=torch.float32), [std], every=T)  # weights = one-hot per step
    gamma = exponent(std)
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    profile = (gamma + 1) * tau ** gamma / T ** (gamma + 1)
    assert final[std].sum().item() == pytest.approx(1.0, abs=1e-4)  # an average
    assert torch.allclose(final[std].double(), profile, atol=2e-4)
    assert final[std][: T // 4].sum() < 0.001  # a short EMA forgets the early steps


def test_posthoc_mix_reproduces_an_ema_that_was_never_tracked():
    """Snapshots of two EMAs (std 0.05 and 0.1) every 100 of 3,000 steps, mixed for std 0.07 and
    0.15 at the end, land close to the EMAs with those stds tracked directly (appendix C)."""
    generator = torch.Generator().manual_seed(0)
    trajectory = torch.randn(3000, 16, generator=generator).cumsum(0) / 30  # random-walk weights
    direct, _ = tracked(trajectory, [0.05, 0.07, 0.1, 0.15], every=3000)
    _, snapshots = tracked(trajectory, [0.05, 0.1], every=100)
    steps, stds, states = zip(*snapshots)
    for std in (0.07, 0.15):
        weights = posthoc_weights(list(steps), list(stds), 3000, std)
        assert weights.sum().item() == pytest.approx(1.0)
        assert profile_error(list(steps), list(stds), 3000, std, weights) < 0.05
        mixed = sum(w * s for w, s in zip(weights.tolist(), states))
        gap = (direct[0.05] - direct[0.1]).norm()  # how far apart the two tracked averages are
        assert (mixed - direct[std]).norm() < 0.05 * gap
    one = posthoc_weights(list(steps), list(stds), 3000, 0.1)  # a tracked profile: that snapshot alone
    assert one[-1].item() == pytest.approx(1.0, abs=1e-6)
    assert one[:-1].abs().max().item() < 1e-6


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={out}", "data.download=false", "train.steps=4", "train.sample_every=0",
        "stages.0.optim.posthoc_ema_std=[0.05, 0.1]"])
    return train(cfg, progress=False)


def test_a_run_saves_snapshots_and_posthoc_mixes_them(snapshot_run, tmp_path):
    ckpt = torch.load(snapshot_run, weights_only=True)
    assert sorted(ckpt["stages"][0]["power_ema"]) == ["0.05", "0.1"]
    assert "power_ema" not in ckpt["stages"][1]  # the SR stage tracks none
    snapshots = sorted((snapshot_run.parent / SNAPSHOT_DIR).glob("*.pt"))
    assert [p.name for p in snapshots] == ["0000002.pt", "0000004.pt"]  # every save_every = 2 steps

    path, errors = posthoc(snapshot_run, tmp_path / "p.pt", 0.1)
    assert list(errors) == [0] and errors[0] < 1e-6  # a tracked std at the last step: exact
    mixed = torch.load(path, weights_only=True)
    for key, value in ckpt["stages"][0]["power_ema"]["0.1"].items():
        torch.testing.assert_close(mixed["stages"][0]["ema"][key], value)
    for key, value in ckpt["stages"][1]["ema"].items():  # no snapshots: its EMA as it was
        assert torch.equal(mixed["stages"][1]["ema"][key], value)
    _, errors = posthoc(snapshot_run, tmp_path / "q.pt", 0.07, step=2)  # earlier, untracked: a mix
    assert 0 < errors[0] < 0.2


def test_a_run_of_one_stage_mixes_that_stage(snapshot_run, tmp_path):
    """A stage trained apart (--stages 1) keeps snapshots of that stage alone; posthoc mixes it
    without asking for the other stages, and the result still combines into a cascade."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path}", "data.download=false", "train.steps=4", "train.sample_every=0",
        "train.stages=[1]", "stages.1.optim.posthoc_ema_std=[0.05, 0.1]"])
    run = train(cfg, progress=False)
    path, errors = posthoc(run, tmp_path / "sr.pt", 0.1)
    assert list(errors) == [1] and errors[1] < 1e-6
    mixed = torch.load(path, weights_only=True)
    assert sorted(mixed["stages"]) == [1]
    for key, value in torch.load(run, weights_only=True)["stages"][1]["power_ema"]["0.1"].items():
        torch.testing.assert_close(mixed["stages"][1]["ema"][key], value)
    joined = torch.load(combine([snapshot_run, path], tmp_path / "joined.pt"), weights_only=True)
    assert sorted(joined["stages"]) == [0, 1]
    for key, value in mixed["stages"][1]["ema"].items():
        assert torch.equal(joined["stages"][1]["ema"][key], value)


def test_a_run_without_snapshots_cannot_be_mixed_or_resumed_with_them(snapshot_run, tiny_cfg, tmp_path):
    plain = train(tiny_cfg, progress=False)
    with pytest.raises(CheckpointError, match="no power-function EMA snapshots up to step 4"):
        posthoc(plain, tmp_path / "x.pt", 0.1)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={tiny_cfg.out_dir}", "data.download=false", "train.steps=6",
        "stages.0.optim.posthoc_ema_std=[0.05]"])
    with pytest.raises(UserError, match="tracked no power-function EMA with std 0.05 for stages.0"):
        train(cfg, resume=plain, progress=False)
    with pytest.raises(UserError, match=r"--step must be in \[1, 4\]"):
        posthoc(snapshot_run, tmp_path / "z.pt", 0.1, step=5)
    proc = run_script("-m", "cdm.checkpoint", "posthoc", str(snapshot_run), str(tmp_path / "y.pt"),
                      "--std", "0.5", expect=2)
    assert_one_line_error(proc, "posthoc: --std must be in (0, 0.28]")
