"""Linear-probe baseline (the paper's LP rows): CoOp's released protocol, in PyTorch.

The maths. Features are L2-normalised (``normalize=True``, the default), then an L2-regularised multinomial logistic
regression is fitted, the same problem as scikit-learn's ``LogisticRegression(C=C, solver="lbfgs", penalty="l2")``
with ``fit_intercept=True`` and three or more classes::

    minimise over W (K, D), b (K,):   mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C N)

which is ``sum_i CE + ||W||^2 / (2 C)`` divided by N (scikit-learn scales it the same way, so its gradient tolerance
means the same thing here). The intercept is not regularised. The solver is ``torch.optim.LBFGS`` in float64 from a
zero start, strong-Wolfe line search, scipy's default history of 10 pairs, up to ``max_iter`` iterations, stopping
when the largest absolute gradient entry is at most 1e-4 (scikit-learn's ``tol``, which scipy applies the same way).
A class absent from the training set still gets a row of W and an entry of b: its logit is pushed down until its
softmax probability (and so its gradient) falls under the tolerance.

The C search, as CoOp's ``lpclip/linear_probe.py`` runs it (written in log10(C), e = log10(C)):

1. Fit each C in ``GRID = (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)`` and score it on the validation set; the peak is
   the first of the best (ties go to the value tried first). 7 entries of ``search``.
2. Start with the interval ``[e_peak - 1, e_peak + 1]``. For each of 8 rounds, fit and score both ends, left
   (smaller C) first; the right end wins only if its validation accuracy is strictly higher. The winner stays as one
   end of the next interval and the midpoint becomes the other end, so the interval halves each round (widths
   2, 1, 1/2, ..., 1/64 decades) and the kept end is scored again in the next round. 2 entries per round.
3. ``best_c`` is the winner of the last round (not the best over the whole search: CoOp reports the last round's
   classifier), and the reported test accuracy is that of its fit on the training set.

So ``search`` always has ``7 + 2 * 8 = 23`` entries. Fits are deterministic, so a value tried again is looked up,
not refitted (its entry is still recorded). Validation accuracies in ``search`` are in percent.

The features, as CoOp's ``lpclip`` feature extractor makes them: one per image from the test transform (short side
resized, centre crop), for the training images too, never augmented views. The sweep takes the training images'
centre views from the cache (``FeatureCache.split("train").center``, one row per image). Where the dataset has no
few-shot validation split (ImageNet), CoOp searches C on the test split: the sweep then passes the test features as
the validation set and records ``"c_search_split": "test"`` (otherwise ``"val"``) in the run's metrics.

Where this departs from CoOp's script: CoOp's released feature extractor saves un-normalised ``clip_model.visual``
outputs; pass ``normalize=False`` to probe those as they are (the sweep does). With exactly two classes
scikit-learn fits a one-logit binary model, while this module stays multinomial (its optimum then matches
scikit-learn's at 2 C).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
"""The initial C values, in the order CoOp tries them."""

NUM_BISECTION_ROUNDS = 8
TOLERANCE = 1e-4  # scikit-learn's default ``tol``: the largest absolute gradient entry at convergence
LBFGS_HISTORY = 10  # scipy's default ``maxcor``, which scikit-learn's lbfgs solver uses
EVALS_PER_ITERATION = 15  # scipy's default ``maxfun`` (15000) over scikit-learn's ``max_iter`` (1000)


@dataclass(frozen=True)
class LinearProbeResult:
    """What one linear probe reports.

    Attributes:
        accuracy: Test accuracy of the final classifier, in percent (0-100).
        per_class_accuracy: Test accuracy per class, in percent, length ``num_classes``; NaN for a class with no test
            sample.
        best_c: The C of the final classifier (the winner of the last bisection round).
        search: ``(C, validation accuracy in percent)`` for every fit scored, in the order tried (7 grid values, then
            two per bisection round).
        predictions: (M,) int64 test predictions of the final classifier.
    """

    accuracy: float
    per_class_accuracy: list[float]
    best_c: float
    search: list[tuple[float, float]]
    predictions: torch.Tensor | None = None


SMALL_PROBLEM = 1 << 22  # N * D * K below which one CPU thread is faster: each step is far too small to share


@contextlib.contextmanager
def _few_threads_for(device: torch.device, size: int):
    """Run a small CPU fit on one thread: thousands of tiny L-BFGS steps otherwise pay a thread hand-off each, which
    on a loaded 2-core machine made these fits about 30x slower (measured in tests/test_linear_probe.py's setting)."""
    if device.type != "cpu" or size >= SMALL_PROBLEM or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    c: float,
    max_iter: int = 1000,
    tol: float = TOLERANCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fits L2-regularised multinomial logistic regression with L-BFGS (no normalisation here).

    Minimises ``mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 c N)`` from ``W = 0, b = 0``.

    Args:
        features: (N, D) training features, any float dtype; the fit runs in float64 on their device.
        labels: (N,) int64 class indices in ``[0, num_classes)``.
        num_classes: K, the number of logits (classes missing from ``labels`` included).
        c: Inverse regularisation strength, > 0.
        max_iter: The most L-BFGS iterations.
        tol: Stop once the largest absolute gradient entry is at most this.

    Returns:
        ``(weight, bias)``: (K, D) and (K,) float64 tensors; the bias is centred (it sums to zero over classes, the
        convention scikit-learn uses for the unpenalised, otherwise unidentifiable multinomial intercept).
    """
    if c <= 0 or not math.isfinite(c):
        raise ValueError(f"C must be positive and finite, got {c}")
    features = features.to(torch.float64)
    num_samples, dim = features.shape
    weight = torch.zeros(num_classes, dim, dtype=torch.float64, device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=features.device, requires_grad=True)
    penalty_scale = 1.0 / (2.0 * c * num_samples)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * EVALS_PER_ITERATION,
        tolerance_grad=tol,
        # scipy's ``ftol`` default in scikit-learn (64 machine epsilons): stop only when progress has stalled.
        tolerance_change=64 * torch.finfo(torch.float64).eps,
        history_size=LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.addmm(bias, features, weight.T)
        loss = F.cross_entropy(logits, labels) + penalty_scale * weight.square().sum()
        loss.backward()
        return loss

    with _few_threads_for(features.device, num_samples * dim * num_classes):
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return weight, bias - bias.mean()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
    *,
    normalize: bool = True,
) -> LinearProbeResult:
    """Runs CoOp's linear probe: the C search on the validation set, then the test accuracy of the chosen fit.

    See the module docstring for the exact search schedule (23 scored fits, ``best_c`` = last round's winner).

    Args:
        train_features: (N, D) float image features.
        train_labels: (N,) int64 labels in ``[0, num_classes)``.
        val_features: (V, D) few-shot validation features, V >= 1 (the test features where the dataset has none,
            as CoOp does on ImageNet).
        val_labels: (V,) int64 labels.
        test_features: (T, D) test features, T >= 1.
        test_labels: (T,) int64 labels.
        num_classes: K, the number of classes (the classifier has K logits even if some are absent from training).
        max_iter: The most L-BFGS iterations per fit.
        device: Where the fits run (float64 there).
        normalize: L2-normalise every feature vector first; ``False`` probes the features as given, as CoOp's
            released script does with its un-normalised features.

    Returns:
        A ``LinearProbeResult``; accuracies in percent.

    Raises:
        ValueError: An empty split, mismatched shapes, or a label outside ``[0, num_classes)``.
    """
    splits = {
        "train": (train_features, train_labels),
        "val": (val_features, val_labels),
        "test": (test_features, test_labels),
    }
    prepared = {}
    for name, (features, labels) in splits.items():
        _check_split(name, features, labels, num_classes)
        features = features.to(device=device, dtype=torch.float64)
        if normalize:
            features = F.normalize(features, dim=-1)
        prepared[name] = (features, labels.to(device=device, dtype=torch.int64))
    dims = {features.shape[1] for features, _ in prepared.values()}
    if len(dims) != 1:
        raise ValueError(f"train, val and test features differ in width: {sorted(dims)}")
    train_x, train_y = prepared["train"]
    val_x, val_y = prepared["val"]
    test_x, test_y = prepared["test"]

    fits: dict[float, tuple[torch.Tensor, torch.Tensor, int]] = {}  # log10(C) -> (weight, bias, val correct)
    search: list[tuple[float, float]] = []

    def score(exponent: float) -> int:
        """Fits (or looks up) C = 10**exponent, records it in ``search`` and returns its val correct count."""
        c = 10.0**exponent
        if exponent not in fits:
            weight, bias = fit_logistic_regression(train_x, train_y, num_classes, c, max_iter=max_iter)
            correct = int((_predict(val_x, weight, bias) == val_y).sum())
            fits[exponent] = (weight, bias, correct)
        correct = fits[exponent][2]
        search.append((c, 100.0 * correct / len(val_y)))
        return correct

    # Correct counts share one denominator, so comparing them is comparing CoOp's accuracies, without float ties.
    grid_exponents = [round(math.log10(c)) for c in GRID]
    grid_correct = [score(float(exponent)) for exponent in grid_exponents]
    peak = grid_exponents[grid_correct.index(max(grid_correct))]  # index() takes the first of equal maxima
    left, right = peak - 1.0, peak + 1.0
    winner = left
    for _ in range(NUM_BISECTION_ROUNDS):
        left_correct, right_correct = score(left), score(right)
        middle = 0.5 * (left + right)
        if left_correct < right_correct:
            winner, left = right, middle
        else:
            winner, right = left, middle

    weight, bias, _ = fits[winner]
    predictions = _predict(test_x, weight, bias)
    hits = (predictions == test_y).to(torch.float64)
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=hits.device).index_add_(0, test_y, hits)
    counts = torch.bincount(test_y, minlength=num_classes).to(torch.float64)
    per_class_accuracy = torch.where(counts > 0, 100.0 * per_class / counts.clamp(min=1), math.nan)
    return LinearProbeResult(
        accuracy=100.0 * float(hits.mean()),
        per_class_accuracy=per_class_accuracy.tolist(),
        best_c=10.0**winner,
        search=search,
        predictions=predictions,
    )


def _predict(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, D) features, (K, D) weight, (K,) bias -> (M,) predicted classes (ties to the lowest index)."""
    return torch.addmm(bias, features, weight.T).argmax(dim=1)


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name}_features must be (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}_labels must be ({features.shape[0]},) to match {name}_features, got shape {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"the {name} split is empty: the linear probe needs at least one {name} sample")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be integer class indices, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"{name}_labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
