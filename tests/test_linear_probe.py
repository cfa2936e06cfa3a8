"""The linear probe: accuracy on separable blobs, CoOp's C-search schedule, the optimum against scikit-learn, and the
sweep's probe as CoOp's lpclip (one centre-view feature per training image; C searched on test without a val split)."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.cache.extract import build_cache
from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions
from fastprompt.data.items import Dataset
from fastprompt.data.registry import load_dataset
from fastprompt.train import linear_probe as linear_probe_module
from fastprompt.train.config import expand_sweep
from fastprompt.train.linear_probe import (
    GRID,
    NUM_BISECTION_ROUNDS,
    LinearProbeResult,
    fit_logistic_regression,
    linear_probe,
)
from fastprompt.train.sweep import SweepOptions, run_sweep

NUM_CLASSES = 5
DIM = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These fits are tiny: on a loaded machine, intra-op thread hand-offs cost far more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_blobs(per_class: int, generator: torch.Generator, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_class * K, D) Gaussian blobs around ``centres`` (K, D), with their (per_class * K,) labels."""
    labels = torch.arange(centres.shape[0]).repeat_interleave(per_class)
    return centres[labels] + 0.5 * torch.randn(len(labels), centres.shape[1], generator=generator), labels


@pytest.fixture(scope="module")
def splits():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(NUM_CLASSES, DIM, generator=generator)
    return {
        "train": make_blobs(8, generator, centres),
        "val": make_blobs(4, generator, centres),
        "test": make_blobs(40, generator, centres),
    }


@pytest.fixture(scope="module")
def probe(splits) -> LinearProbeResult:
    return linear_probe(*splits["train"], *splits["val"], *splits["test"], num_classes=NUM_CLASSES)


def objective_gradient(features, labels, weight, bias, c):
    """The largest absolute gradient entry of ``mean CE + ||W||^2 / (2 c N)`` at (weight, bias)."""
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    loss = F.cross_entropy(features @ weight.T + bias, labels) + weight.square().sum() / (2 * c * len(labels))
    loss.backward()
    return max(weight.grad.abs().max().item(), bias.grad.abs().max().item())


def test_separable_blobs_accuracy(probe):
    assert probe.accuracy > 90.0
    assert len(probe.per_class_accuracy) == NUM_CLASSES
    assert all(0.0 <= accuracy <= 100.0 for accuracy in probe.per_class_accuracy)
    assert probe.accuracy == pytest.approx(sum(probe.per_class_accuracy) / NUM_CLASSES)  # balanced test set


def test_search_schedule(probe):
    """7 grid values, then 8 rounds of (left, right): 23 entries; best_c is the last round's winner."""
    search = probe.search
    assert len(search) == len(GRID) + 2 * NUM_BISECTION_ROUNDS == 23
    assert [c for c, _ in search[: len(GRID)]] == list(GRID)
    grid_accuracies = [accuracy for _, accuracy in search[: len(GRID)]]
    peak = GRID[grid_accuracies.index(max(grid_accuracies))]

    rounds = [search[len(GRID) + 2 * step : len(GRID) + 2 * step + 2] for step in range(NUM_BISECTION_ROUNDS)]
    assert rounds[0][0][0] == pytest.approx(peak / 10) and rounds[0][1][0] == pytest.approx(peak * 10)
    winner = None
    for step, ((c_left, acc_left), (c_right, acc_right)) in enumerate(rounds):
        assert math.log10(c_right) - math.log10(c_left) == pytest.approx(2.0 / 2**step)
        if winner is not None:
            assert winner in (c_left, c_right)  # the kept end is scored again
        winner = c_right if acc_left < acc_right else c_left
    assert probe.best_c == winner
    assert probe.best_c in [c for c, _ in search]
    tried = {}
    for c, accuracy in search:
        assert tried.setdefault(c, accuracy) == accuracy  # a C tried again scores the same


def test_normalizes_features(splits, probe):
    """With normalize=True, rescaling each feature vector changes nothing."""
    generator = torch.Generator().manual_seed(1)
    rescaled = []
    for name in ("train", "val", "test"):
        features, labels = splits[name]
        rescaled += [features * (0.1 + 10 * torch.rand(len(features), 1, generator=generator)), labels]
    again = linear_probe(*rescaled, num_classes=NUM_CLASSES)
    assert again.best_c == probe.best_c
    assert again.accuracy == pytest.approx(probe.accuracy)
    assert [c for c, _ in again.search] == [c for c, _ in probe.search]


@pytest.mark.parametrize("c", [1e-2, 1.0, 1e2])
def test_fit_reaches_tolerance(splits, c):
    features, labels = splits["train"]
    features = F.normalize(features.double(), dim=-1)
    weight, bias = fit_logistic_regression(features, labels, NUM_CLASSES, c)
    assert weight.dtype == torch.float64 and weight.shape == (NUM_CLASSES, DIM) and bias.shape == (NUM_CLASSES,)
    assert bias.sum().abs().item() < 1e-12
    assert objective_gradient(features, labels, weight, bias, c) <= 1e-4


def test_class_missing_from_training(splits):
    """Class 5 has test samples but no training or validation sample; class 6 appears nowhere."""
    num_classes = NUM_CLASSES + 2
    generator = torch.Generator().manual_seed(2)
    test_features, test_labels = splits["test"]
    extra = torch.randn(10, DIM, generator=generator)
    test_features = torch.cat([test_features, extra])
    test_labels = torch.cat([test_labels, torch.full((10,), NUM_CLASSES)])
    result = linear_probe(*splits["train"], *splits["val"], test_features, test_labels, num_classes=num_classes)
    assert len(result.per_class_accuracy) == num_classes
    assert result.per_class_accuracy[NUM_CLASSES] == 0.0  # its logit only ever learned to be small
    assert math.isnan(result.per_class_accuracy[NUM_CLASSES + 1])
    assert result.accuracy > 80.0

    train_features, train_labels = splits["train"]
    weight, bias = fit_logistic_regression(F.normalize(train_features, dim=-1), train_labels, num_classes, 1.0)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert bias[NUM_CLASSES:].max() < bias[:NUM_CLASSES].min()


def test_rejects_bad_inputs(splits):
    train, val, test = splits["train"], splits["val"], splits["test"]
    empty = (torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="val split is empty"):
        linear_probe(*train, *empty, *test, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 3\)"):
        linear_probe(*train, *val, *test, num_classes=3)
    with pytest.raises(ValueError, match="differ in width"):
        linear_probe(*train, val[0][:, :8], val[1], *test, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="must be positive"):
        fit_logistic_regression(*train, NUM_CLASSES, 0.0)


@pytest.mark.parametrize("c", [1e-2, 1.0, 1e2])
def test_matches_sklearn(splits, c):
    """Same objective as scikit-learn's multinomial lbfgs: same predictions at its defaults, same optimum when tight."""
    from sklearn import linear_model  # the dev extra: this check must run, never skip

    train_features = F.normalize(splits["train"][0].double(), dim=-1)
    test_features = F.normalize(splits["test"][0].double(), dim=-1)
    train_labels = splits["train"][1]

    weight, bias = fit_logistic_regression(train_features, train_labels, NUM_CLASSES, c)
    reference = linear_model.LogisticRegression(C=c, max_iter=1000).fit(train_features.numpy(), train_labels.numpy())
    ours = (test_features @ weight.T + bias).argmax(dim=1)
    theirs = torch.from_numpy(reference.predict(test_features.numpy()))
    assert (ours == theirs).double().mean().item() >= 0.98

    tight = 1e-9
    weight, bias = fit_logistic_regression(train_features, train_labels, NUM_CLASSES, c, max_iter=10_000, tol=tight)
    reference = linear_model.LogisticRegression(C=c, max_iter=10_000, tol=tight)
    reference.fit(train_features.numpy(), train_labels.numpy())
    scale = max(1.0, weight.abs().max().item())
    torch.testing.assert_close(weight, torch.from_numpy(reference.coef_), rtol=0, atol=1e-5 * scale)
    reference_bias = torch.from_numpy(reference.intercept_)
    torch.testing.assert_close(bias, reference_bias - reference_bias.mean(), rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def probe_caches(tmp_path_factory):
    """Caches of one toy dataset built with the tiny model: "val" with a few-shot validation split, and "noval"
    without one, as ImageNet's (empty validation split, no validation subsets); 3 augmented views per image."""
    from test_cache import tiny_clip, write_coop_dataset

    root = tmp_path_factory.mktemp("probe-data")
    write_coop_dataset(root, per_split=(("train", 4), ("val", 2), ("test", 3)))
    dataset = load_dataset("CacheToy", root)
    no_val = Dataset(dataset.name, dataset.classnames, dataset.train, [], dataset.test, dataset.templates,
                     dataset.image_root, fewshot_val=False)  # fmt: skip
    clip = tiny_clip()
    out = tmp_path_factory.mktemp("probe-caches")
    options = CacheOptions(shots=(2,), seeds=(1,), views=3, dtype="fp32")
    for name, data in (("val", dataset), ("noval", no_val)):
        build_cache(data, clip, out / name, options, num_workers=0, progress=False)
    return clip, out


def sweep_probe(cache, clip, out, monkeypatch) -> tuple[dict, dict]:
    """Run the sweep's 2-shot seed-1 linear probe; returns its result.json and the arguments the probe was given."""
    calls = []

    def recording_probe(*args, **kwargs):
        calls.append(inspect.signature(linear_probe).bind(*args, **kwargs).arguments)
        return linear_probe(*args, **kwargs)

    monkeypatch.setattr(linear_probe_module, "linear_probe", recording_probe)
    (config,) = expand_sweep({"method": ["linear_probe"], "shots": [2], "seed": [1]}, {"dataset": cache.dataset})
    run_sweep(cache, clip, [config], out, SweepOptions(progress=False))
    assert len(calls) == 1
    return json.loads((out / config.run_id / "result.json").read_text()), calls[0]


def test_sweep_probe_fits_one_centre_view_feature_per_training_image(probe_caches, tmp_path, monkeypatch):
    clip, out = probe_caches
    cache = FeatureCache(out / "val")
    result, given = sweep_probe(cache, clip, tmp_path, monkeypatch)
    subset, train, val = cache.fewshot(2, 1), cache.split("train"), cache.split("val")
    train_x = given["train_features"]
    assert train_x.shape == (len(subset.train_keys), cache.feature_dim)  # one sample per image, not per view
    assert torch.equal(train_x, train.center[subset.train_index].float())
    assert torch.equal(given["train_labels"], train.labels[subset.train_index])
    assert torch.equal(given["val_features"], val.center[subset.val_index].float())
    assert len(given["val_labels"]) == len(subset.val_keys) > 0
    assert torch.equal(given["test_features"], cache.split("test").center.float()) and given["num_classes"] == 3
    assert given["normalize"] is False  # CoOp fits the raw image-tower outputs
    metrics = result["metrics"]
    assert result["status"] == "done" and metrics["c_search_split"] == "val"
    direct = linear_probe(**given)
    assert metrics["accuracy"] == direct.accuracy and metrics["best_c"] == direct.best_c


def test_sweep_probe_without_a_validation_split_searches_c_on_test(probe_caches, tmp_path, monkeypatch):
    """ImageNet's case: no few-shot validation images, so C is searched on the test split (CoOp), and recorded."""
    clip, out = probe_caches
    cache = FeatureCache(out / "noval")
    assert cache.manifest["splits"]["val"]["count"] == 0 and cache.fewshot(2, 1).val_keys == []
    result, given = sweep_probe(cache, clip, tmp_path, monkeypatch)
    assert torch.equal(given["val_features"], given["test_features"])
    assert torch.equal(given["val_labels"], given["test_labels"])
    assert given["train_features"].shape == (len(cache.fewshot(2, 1).train_keys), cache.feature_dim)
    assert result["status"] == "done" and result["metrics"]["c_search_split"] == "test"


def test_format_1_cache_trains_prompts_but_the_probe_asks_for_a_rebuild(probe_caches, tmp_path):
    from test_cache import downgrade_to_format_1

    clip, out = probe_caches
    old = downgrade_to_format_1(out / "val", tmp_path / "format1")
    (coop,) = expand_sweep({"method": ["coop"], "shots": [2], "seed": [1]}, {"dataset": "CacheToy", "epochs": 1})
    (record,) = run_sweep(FeatureCache(old), clip, [coop], tmp_path / "prompts", SweepOptions(progress=False))
    assert record["status"] == "done"
    args = ["train", "--cache", str(old), "--out", str(tmp_path / "probe"), "--methods", "linear_probe",
            "--shots", "2", "--seeds", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    message = " ".join(result.output.split())
    assert "(format 1) holds no centre-crop feature of its training images" in message and "rebuild it" in message
