"""The evaluation: two feature spaces, equal-N floors, spreads, and the default label guidance."""
import numpy as np
import pytest
import torch

from cdm.checkpoint import CheckpointError, save_checkpoint
from cdm.classifier import MnistClassifier, MnistResNet, load_classifier
from cdm.datasets import load_mnist
from cdm.cascade import Stage, build_stage, class_counts, default_labels
from cdm.evaluate import FeatureSpace, at_floor, floor_order, floor_rows, markdown_table, mean_std, score, stage_split

from conftest import assert_one_line_error, run_script


def random_network(cls, seed):
    torch.manual_seed(seed)
    return cls().eval()


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    """Both architectures (randomly initialised: the statistics need features, not accuracy),
    loaded from files as evaluate loads them, with 2,000 test digits as the reference set."""
    folder = tmp_path_factory.mktemp("nets")
    reference = load_mnist(_root(), False, 32, 1, train=False)[0][:2000]
    out = []
    for seed, cls in enumerate((MnistClassifier, MnistResNet)):
        path = save_checkpoint({"arch": cls.arch, "model": random_network(cls, seed).state_dict()},
                               folder / f"mnist_{cls.arch}.pt")
        out.append(FeatureSpace.build(cls.arch, path, reference))
    return out


def _root():
    import os
    return os.environ.get("CDM_DATA_ROOT", "data")


@pytest.fixture(scope="module")
def train_digits():
    images, labels = load_mnist(_root(), False, 32, 1)
    return images[:3000], labels[:3000]


def test_the_second_network_differs_loads_and_reads_32x32_samples(tmp_path):
    net = random_network(MnistResNet, 0)
    path = save_checkpoint({"arch": "resnet28", "model": net.state_dict()}, tmp_path / "r.pt")
    loaded = load_classifier(path)
    assert isinstance(loaded, MnistResNet) and not loaded.training
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.features(x), net.features(x))
    assert loaded.features(x).shape == (3, 128)
    # a file from before the second network (no "arch") is the cnn32
    old = save_checkpoint({"model": MnistClassifier().state_dict()}, tmp_path / "old.pt")
    assert isinstance(load_classifier(old), MnistClassifier)


@pytest.mark.parametrize("payload, message", [
    (None, "no such file; train one with `python -m cdm.classifier"),
    ({"arch": "vgg", "model": {}}, "unknown architecture or missing entry 'vgg'"),
    ({"arch": "resnet28", "model": MnistClassifier().state_dict()}, "cannot be loaded"),
])
def test_evaluation_network_errors_name_the_file(tmp_path, payload, message):
    path = tmp_path / "net.pt"
    if payload is not None:
        save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match="evaluation network '.*net.pt'") as err:
        load_classifier(path)
    assert message in str(err.value)


def test_evaluate_with_a_missing_network_is_one_line(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 32, 32, 1), np.uint8))
    proc = run_script("-m", "cdm.evaluate", "--npz", str(tmp_path / "s.npz"), "--classifier",
                      str(tmp_path / "nope.pt"), "--out", str(tmp_path), expect=2)
    assert_one_line_error(proc, f"evaluation network '{tmp_path / 'nope.pt'}': no such file")


def test_floor_holds_real_digits_and_rejects_a_shifted_distribution(spaces, train_digits):
    images, labels = train_digits
    floor = floor_rows(spaces, images[:2500], labels[:2500], [400], draws=5)[0]
    assert floor["n"] == 400 and floor["label_acc_cnn32"] >= 0  # labels travel with the digits
    for space in spaces:
        assert floor[f"fd_{space.name}_std"] > 0
    fresh = score(spaces, images[2500:2900])  # 400 other real digits: a sixth draw
    shifted = score(spaces, (images[2500:2900] * 0.7 + 0.2).clamp(-1, 1))  # fainter, greyer digits
    for space in spaces:
        mean, std = floor[f"fd_{space.name}"], floor[f"fd_{space.name}_std"]
        assert abs(fresh[f"fd_{space.name}"] - mean) < 3 * std
        assert shifted[f"fd_{space.name}"] > mean + 10 * std
    assert at_floor(fresh, {400: floor}, spaces) != "no"
    assert at_floor(shifted, {400: floor}, spaces) == "no"


def test_floor_refuses_more_draws_than_the_data_allows(spaces, train_digits):
    with pytest.raises(Exception, match="5 disjoint sets of N = 1000 need 5000 training digits"):
        floor_rows(spaces, *train_digits, [1000], draws=5)


def test_stratified_classes_hold_each_share_exactly_on_both_sides(spaces, train_digits):
    shares = torch.tensor([0.5, 0.3, 0.2])
    assert class_counts(7, shares).tolist() == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: the largest remainder
    draws = [default_labels(1000, 3, "cpu", torch.Generator().manual_seed(s), shares.tolist(), stratified=True)
             for s in (0, 1)]
    for labels in draws:
        assert torch.bincount(labels, minlength=3).tolist() == [500, 300, 200]
    assert not torch.equal(*draws)  # the same histogram in another order
    drawn = default_labels(1000, 3, "cpu", torch.Generator().manual_seed(0), shares.tolist())
    assert torch.bincount(drawn, minlength=3).tolist() != [500, 300, 200]  # multinomial: it varies
    images, labels = train_digits
    floor = floor_rows(spaces, images, labels, [500], draws=4, stratified=True)[0]
    assert "class-stratified" in floor["samples"] and floor["n"] == 500
    order = floor_order(3000)
    want = class_counts(500, torch.bincount(labels)).tolist()
    firsts = torch.cat([order[labels[order] == k][:c] for k, c in enumerate(want)])
    assert score(spaces, images[firsts], labels[firsts])["fd_cnn32"] == pytest.approx(floor["fd_cnn32_each"][0])
    halves = torch.tensor([0] * 5 + [1] * 5)  # N = 5: one class gets 3, twice that is more than 5
    with pytest.raises(Exception, match="--classes stratified: 2 disjoint sets of N = 5 need 6 training "
                                        "digits of class [01], there are 5"):
        floor_rows(spaces, images[:10], halves, [5], draws=2, stratified=True)


def test_spread_over_seeds_and_bootstrap(spaces, train_digits):
    rows = [{"n": 10, "fd": 1.0, "spread": "x"}, {"n": 10, "fd": 3.0, "spread": "x"}]
    assert mean_std(rows) == {"n": 10, "fd": 2.0, "fd_std": pytest.approx(2 ** 0.5), "fd_each": [1.0, 3.0]}
    assert "fd_each" not in mean_std(rows[:1])  # one row: no spread, nothing per row
    assert "2 ± 1.4" in markdown_table([mean_std(rows)], ["fd"])
    images, labels = train_digits
    small = score(spaces, images[:150], labels[:150], bootstrap=50)
    large = score(spaces, images[:1200], labels[:1200], bootstrap=50)
    for space in spaces:  # a resample of fewer samples varies more
        for metric in ("fd", "precision", "recall"):
            assert 0 < large[f"{metric}_{space.name}_std"] < small[f"{metric}_{space.name}_std"]
    assert small["label_acc_cnn32_std"] >= 0


def test_stages_apart_tell_an_untrained_stage_from_real_digits(spaces, train_digits, tiny_cfg):
    """--split: an untrained base is far from the true 8x8 digits, the floor beside it (another
    set of real 8x8 digits) is near them; the real-digit row is the digits scored like samples.
    A base given alone gets the same two base rows."""
    stages = []
    for index, stage_cfg in enumerate(tiny_cfg.stages):
        torch.manual_seed(index)
        model, diffusion, low_res = build_stage(tiny_cfg, index, "cpu")
        stages.append(Stage(index, stage_cfg, model.eval(), diffusion, low_res))
    images, labels = train_digits
    rows = stage_split(stages, images[:200], labels[:200], images[200:400], spaces, seeds=[0],
                       bf16=False, batch_size=100)
    other, base, real, sr = rows
    assert [r["n"] for r in rows] == [200] * 4 and "8x8" in base["part"]
    assert real["fd_cnn32"] == score(spaces, images[:200], labels[:200])["fd_cnn32"]
    for space in spaces:
        fd = f"fd_{space.name}"
        assert base[fd] > 5 * other[fd]
        assert sr[fd] > real[fd]
    alone = stage_split(stages[:1], images[:200], labels[:200], images[200:400], spaces, seeds=[0],
                        bf16=False, batch_size=100)
    assert alone == [other, base]  # a base alone (docs/experiments/base_apart.py): its rows, no SR
