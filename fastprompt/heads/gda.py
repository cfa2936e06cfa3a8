"""GDA: Gaussian discriminant analysis on CLIP features (Wang et al., ICLR 2024, "A hard-to-beat baseline for
training-free CLIP-based adaptation"), as its release (mrflogs/ICLR24, ``main_few_shots.py``) computes it.

The maths. From the L2-normalised features x_i (N, D) of the augmented views of the training images (every view is
one sample; the release takes ``augment_epoch = 10`` passes) with labels y_i:

    mu_k = mean of the x_i of class k                                  (K, D)
    S    = sum_i (x_i - mu_{y_i}) (x_i - mu_{y_i})^T                   (D, D), the pooled within-class scatter
    P    = D * (S + tr(S) / (N - 1) * I)^-1                            the release's shrinkage ("KS") precision
    W    = mu P                                                        (K, D)
    b_k  = log(1 / K) - mu_k P mu_k^T / 2                              (K,), uniform class prior

(the release writes ``(N - 1) * cov + trace(cov) * I`` with ``cov`` the covariance of the centred samples, which is
S / (N - 1): the centred samples have mean zero). The classifier is blended with the zero-shot logits,

    logits(f) = logit_scale * f T^T + alpha * (f W^T + b),

alpha searched on the few-shot validation split over ``ALPHAS`` (the first strictly better validation accuracy wins,
from accuracy 0 and alpha = 0.1, as the release does).

fastprompt computes S and its inverse in float64 (the release uses ``torch.linalg.pinv`` in the model's precision; the
matrix is symmetric positive definite whenever tr(S) > 0, so the inverse and the pseudo-inverse agree), and uses the
first ``min(V, CACHE_VIEWS)`` cached views where the release augments with RandomResizedCrop scale (0.5, 1).
"""

from __future__ import annotations

import math

import torch

from fastprompt.errors import FastPromptError
from fastprompt.heads.common import finish, normalize, require_every_class, zero_shot_logits
from fastprompt.heads.task import HeadResult, HeadTask, check_task

CACHE_VIEWS = 10  # the release's augment_epoch (configs/few_shots/*.yaml)
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the release's grid, in its order
INITIAL_ALPHA = 0.1  # the release's best_alpha before the search (kept if no alpha scores above 0 on val)


def gda_classifier(samples: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GDA weights (K, D) and bias (K,) of normalised samples (N, D) with labels (N,) (module docstring).

    Raises:
        FastPromptError: the within-class scatter is zero (one sample per class: one view of one image each).
    """
    samples = samples.double()
    num_samples, dim = samples.shape
    counts = torch.bincount(labels, minlength=num_classes).double()
    means = torch.zeros(num_classes, dim, dtype=torch.float64, device=samples.device)
    means = means.index_add_(0, labels, samples) / counts[:, None]
    centred = samples - means[labels]
    scatter = centred.T @ centred
    trace = float(scatter.trace())
    if num_samples < 2 or trace <= 0.0:
        raise FastPromptError(
            "GDA needs within-class variation, but every class has a single training sample; "
            "use a feature cache with several augmented views per image (V > 1) or more shots."
        )
    regularised = scatter + trace / (num_samples - 1) * torch.eye(dim, dtype=torch.float64, device=samples.device)
    precision = dim * torch.linalg.inv(regularised)
    weight = means @ precision
    bias = math.log(1.0 / num_classes) - 0.5 * (weight * means).sum(dim=1)
    return weight.float(), bias.float()


def fit_gda(task: HeadTask) -> HeadResult:
    """GDA: the closed-form classifier from the cached views, the blend weight searched on val, one test pass."""
    check_task(task, needs_val=True)
    require_every_class(task, "GDA")
    views = min(task.train_views.shape[1], CACHE_VIEWS)
    samples = normalize(task.train_views[:, :views]).reshape(-1, task.train_views.shape[-1])
    labels = task.train_labels.repeat_interleave(views)
    weight, bias = gda_classifier(samples, labels, task.num_classes)

    val = normalize(task.val_features)
    val_zero_shot, val_gda = zero_shot_logits(val, task), val @ weight.T + bias
    best_correct, best_alpha = 0, INITIAL_ALPHA
    for alpha in ALPHAS:
        correct = int(((val_zero_shot + alpha * val_gda).argmax(dim=-1) == task.val_labels).sum())
        if correct > best_correct:
            best_correct, best_alpha = correct, alpha

    test = normalize(task.test_features)
    scores = test @ torch.cat([task.text_weights.float(), weight]).T  # one pass over the test features
    logits = task.logit_scale * scores[:, : task.num_classes] + best_alpha * (scores[:, task.num_classes :] + bias)
    metrics = {
        "alpha": best_alpha,
        "val_accuracy": 100.0 * best_correct / task.val_labels.numel(),
        "search_split": "val",
        "views": views,
    }
    return finish(task, logits, metrics, [], {"weight": weight, "bias": bias})
