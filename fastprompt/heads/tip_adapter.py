"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) on cached features, as their release runs them.

The maths (release: gaopengcuhk/Tip-Adapter, ``main.py`` and ``utils.py``). The cache keys are the few-shot training
images' features averaged over augmented passes and L2-normalised, ``keys`` (n, D); the values are their one-hot
labels ``L`` (n, K). For a normalised feature f (1, D)::

    logits(f) = logit_scale * f T^T + alpha * exp(-beta * (1 - f keys^T)) L

(T the normalised zero-shot classifier; the release writes 100 for logit_scale). alpha and beta are searched on the
few-shot validation split over the release's grid: 200 betas ``0.1 + i (s_beta - 0.1) / 200`` and 20 alphas
``0.1 + j (s_alpha - 0.1) / 20`` (i, j from 0), betas in the outer loop, the first strictly better validation accuracy
wins (from accuracy 0 and alpha = beta = 0). ``SEARCH_SCALES`` holds the release's (s_beta, s_alpha) per dataset.

Tip-Adapter-F makes the keys trainable: AdamW (lr 0.001, eps 1e-4, torch's default weight decay 0.01), a cosine
annealing of the rate per step over all steps (no warm-up), batches of 256 without dropping the last one, 20 epochs
(100 on EuroSAT), training with the dataset's initial alpha and beta (``INIT_ALPHA_BETA``), then the alpha/beta search
on the validation split with the trained keys.

Where fastprompt departs from the release (docs/adapters.md has the list):
- the release averages 10 augmented passes (RandomResizedCrop scale (0.5, 1)); fastprompt averages the first
  ``min(V, CACHE_VIEWS)`` cached views (RandomResizedCrop scale (0.08, 1), the prompt trainer's augmentation);
- Tip-Adapter-F trains on one cached view per image per epoch (a fresh permutation and view per epoch, from the run's
  generator) where the release draws a fresh augmentation;
- the release keeps the epoch with the best TEST accuracy and reports max(best test accuracy, final test accuracy);
  fastprompt keeps the epoch with the best VALIDATION accuracy (at the initial alpha and beta; the first best on ties)
  and reports the test accuracy of that model after the validation search, so the test split is read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.heads.common import (
    EpochStats,
    all_item_batches,
    ce_cotangent,
    finish,
    kl_cotangent,
    normalize,
    project,
    zero_shot_logits,
)
from fastprompt.heads.task import HeadResult, HeadTask, check_task

CACHE_VIEWS = 10  # the release's ``augment_epoch``: augmented passes averaged into each key
SEARCH_STEPS = (200, 20)  # the release's ``search_step`` (betas, alphas), the same in every config
# (s_beta, s_alpha): the release's ``search_scale`` per dataset (configs/*.yaml at RN50, 16 shots).
SEARCH_SCALES = {
    "ImageNet": (7.0, 3.0),
    "Caltech101": (12.0, 5.0),
    "DescribableTextures": (13.0, 13.0),
    "EuroSAT": (12.0, 10.0),
    "FGVCAircraft": (30.0, 30.0),
    "Food101": (10.0, 10.0),
    "OxfordFlowers": (50.0, 50.0),
    "OxfordPets": (7.0, 3.0),
    "StanfordCars": (20.0, 10.0),
    "SUN397": (12.0, 10.0),
    "UCF101": (7.0, 3.0),
}
# (init_alpha, init_beta): the release's values per dataset, used while training Tip-Adapter-F.
INIT_ALPHA_BETA = {
    "ImageNet": (1.17, 1.0),
    "Caltech101": (3.0, 1.0),
    "DescribableTextures": (2.0, 1.0),
    "EuroSAT": (2.0, 1.0),
    "FGVCAircraft": (5.0, 1.0),
    "Food101": (1.17, 1.0),
    "OxfordFlowers": (10.0, 1.0),
    "OxfordPets": (1.17, 1.0),
    "StanfordCars": (3.0, 1.0),
    "SUN397": (1.17, 1.0),
    "UCF101": (3.0, 1.0),
}
FALLBACK_DATASET = "ImageNet"  # fastprompt's choice for a dataset the release has no config for
ADAMW_EPS = 1e-4  # the release's torch.optim.AdamW(..., eps=1e-4)
LOOKUPS = ("dense", "faiss")


def search_grid(dataset: str) -> tuple[list[float], list[float]]:
    """(betas, alphas) of the release's search for ``dataset`` (ImageNet's grid for a dataset it has no config for)."""
    scale_beta, scale_alpha = SEARCH_SCALES.get(dataset, SEARCH_SCALES[FALLBACK_DATASET])
    steps_beta, steps_alpha = SEARCH_STEPS
    betas = [i * (scale_beta - 0.1) / steps_beta + 0.1 for i in range(steps_beta)]
    alphas = [i * (scale_alpha - 0.1) / steps_alpha + 0.1 for i in range(steps_alpha)]
    return betas, alphas


def cache_keys(train_views: torch.Tensor, views: int = CACHE_VIEWS) -> torch.Tensor:
    """(n, D) keys: the mean of the first min(V, views) raw views of each image, L2-normalised (the release's order:
    average, then normalise)."""
    return normalize(train_views[:, :views].float().mean(dim=1))


def cache_logits(affinity: torch.Tensor, labels: torch.Tensor, num_classes: int, beta: float) -> torch.Tensor:
    """(N, K) = exp(-beta (1 - affinity)) @ one_hot(labels), for affinity (N, n) and labels (n,).

    The one-hot product is a sum of columns per class, done as ``index_add`` (O(N n) instead of O(N n K)).
    """
    weights = (beta * affinity - beta).exp()  # the release's ((-1) * (beta - beta * affinity)).exp(), same rounding
    out = torch.zeros(affinity.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return out.index_add_(1, labels.to(weights.device), weights)


def affinities(features_norm: torch.Tensor, keys: torch.Tensor, lookup: str = "dense") -> tuple[torch.Tensor, str]:
    """(N, n) inner products of normalised features and keys, and the lookup that computed them.

    ``lookup="faiss"`` uses ``fastprompt.faiss_index.inner_products`` (an exact inner-product index); where that module
    is not installed it falls back to the dense product and says so in the returned name.
    """
    if lookup not in LOOKUPS:
        raise FastPromptError(f"Unknown lookup {lookup!r}; use 'dense' or 'faiss'.")
    if lookup == "faiss":
        try:
            from fastprompt.faiss_index import inner_products
        except ImportError:
            return features_norm @ keys.T, "dense (fastprompt.faiss_index unavailable)"
        return inner_products(features_norm.contiguous(), keys.contiguous()), "faiss"
    return features_norm @ keys.T, "dense"


def tip_logits(
    features_norm: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    task: HeadTask,
    alpha: float,
    beta: float,
    lookup: str = "dense",
) -> torch.Tensor:
    """(N, K) Tip-Adapter logits of normalised features (N, D) with keys (n, D) and their labels (n,)."""
    affinity, _ = affinities(features_norm, keys, lookup)
    return zero_shot_logits(features_norm, task) + alpha * cache_logits(affinity, labels, task.num_classes, beta)


@torch.no_grad()
def search_alpha_beta(task: HeadTask, keys: torch.Tensor) -> dict:
    """The release's alpha/beta search on the validation split only (module docstring); never reads the test split.

    Per beta, the cache logits are computed once and all alphas are scored together; the buffers are reused across
    betas (a fresh (m, n) allocation per beta cost more than the exponentials on a CPU). The sums keep the release's
    rounding: ``beta * affinity - beta``, then ``cache * alpha + zero-shot``.

    Returns:
        {"alpha", "beta", "val_accuracy" (percent), "search_split": "val"}.
    """
    features = normalize(task.val_features)
    labels = task.val_labels
    betas, alphas = search_grid(task.config.dataset)
    zero_shot = zero_shot_logits(features, task)
    affinity = features @ keys.T
    alpha_column = torch.tensor(alphas, dtype=torch.float32, device=features.device)[:, None, None]
    weights = torch.empty_like(affinity)
    cache = torch.empty_like(zero_shot)
    scored = zero_shot.new_empty(len(alphas), *zero_shot.shape)
    best_correct, best_beta, best_alpha = 0, 0.0, 0.0
    for beta in betas:
        torch.mul(affinity, beta, out=weights).sub_(beta).exp_()
        cache.zero_().index_add_(1, task.train_labels, weights)
        torch.mul(cache, alpha_column, out=scored).add_(zero_shot)
        correct = (scored.argmax(dim=-1) == labels).sum(dim=1).tolist()  # (alphas,)
        for alpha, hits in zip(alphas, correct, strict=True):
            if hits > best_correct:  # correct counts share one denominator: the release's strict accuracy test
                best_correct, best_beta, best_alpha = hits, beta, alpha
    return {
        "alpha": best_alpha,
        "beta": best_beta,
        "val_accuracy": 100.0 * best_correct / labels.numel(),
        "search_split": "val",
    }


def fit_tip_adapter(task: HeadTask, lookup: str = "dense") -> HeadResult:
    """Training-free Tip-Adapter: keys from the cached views, alpha/beta searched on val, one pass over the test split.

    Args:
        task: the run; ``val_features`` must not be empty.
        lookup: "dense" (a matrix product) or "faiss" (an exact inner-product index) for the test affinities.
    """
    check_task(task, needs_val=True)
    keys = cache_keys(task.train_views)
    chosen = search_alpha_beta(task, keys)
    test = normalize(task.test_features)
    if lookup == "dense":  # one product against [text weights; keys]: a single pass over the test features
        scores = test @ torch.cat([task.text_weights.float(), keys]).T
        zero_shot, affinity, used = (
            task.logit_scale * scores[:, : task.num_classes],
            scores[:, task.num_classes :],
            "dense",
        )
    else:
        zero_shot = zero_shot_logits(test, task)
        affinity, used = affinities(test, keys, lookup)
    logits = zero_shot + chosen["alpha"] * cache_logits(affinity, task.train_labels, task.num_classes, chosen["beta"])
    views = min(task.train_views.shape[1], CACHE_VIEWS)
    metrics = {**chosen, "views_averaged": views, "lookup": used}
    return finish(task, logits, metrics, [], {"cache_keys": keys, "cache_labels": task.train_labels})


def train_keys(task: HeadTask, keys: torch.Tensor, *, prograd: bool) -> tuple[torch.Tensor, list[dict], int]:
    """Tip-Adapter-F's training of the keys (module docstring); returns (the best-on-val keys, log, best epoch)."""
    config = task.config
    alpha, beta = INIT_ALPHA_BETA.get(config.dataset, INIT_ALPHA_BETA[FALLBACK_DATASET])
    views = normalize(task.train_views)
    n, num_views, _ = views.shape
    labels = task.train_labels
    teacher_all = zero_shot_logits(views, task)  # (n, V, K): the head's zero-shot part and ProGrad's teacher
    val = normalize(task.val_features)
    val_zero_shot = zero_shot_logits(val, task)

    keys = torch.nn.Parameter(keys.detach().clone())
    # fused: torch's one-pass AdamW (the same update; about 5x faster than the per-tensor loop on a CPU)
    optimizer = torch.optim.AdamW([keys], lr=config.lr, eps=ADAMW_EPS, weight_decay=config.weight_decay, fused=True)
    iterations = -(-n // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * iterations)
    offsets = torch.tensor([0, keys.numel()], dtype=torch.int64)
    best_correct, best_epoch, best_keys = -1, -1, keys.detach().clone()
    log = []
    for epoch in range(config.epochs):
        sums = EpochStats()
        for items, view in all_item_batches(n, num_views, config.batch_size, task.generator):
            items, view = items.to(views.device), view.to(views.device)
            features, teacher = views[items, view], teacher_all[items, view]
            logits = teacher + alpha * cache_logits(features @ keys.T, labels, task.num_classes, beta)
            loss = F.cross_entropy(logits.detach(), labels[items])
            stats = None
            if prograd:  # both cotangents through one batched backward pass of the same forward
                cotangents = torch.stack(
                    [ce_cotangent(logits.detach(), labels[items]), kl_cotangent(logits.detach(), teacher)]
                )
                (grads,) = torch.autograd.grad(logits, keys, cotangents, is_grads_batched=True)
                grad, stats = project(grads[0].reshape(-1), grads[1].reshape(-1), offsets, config.lam)
                keys.grad = grad.view_as(keys)
            else:
                (keys.grad,) = torch.autograd.grad(logits, keys, ce_cotangent(logits.detach(), labels[items]))
            rate = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            sums.add(loss.detach(), logits.detach(), labels[items], stats)
        record = sums.record(epoch, rate, prograd)  # the rate of the epoch's last step
        with torch.no_grad():
            val_logits = val_zero_shot + alpha * cache_logits(val @ keys.T, labels, task.num_classes, beta)
            correct = int((val_logits.argmax(dim=-1) == task.val_labels).sum())
        record["val_accuracy"] = 100.0 * correct / task.val_labels.numel()
        if correct > best_correct:
            best_correct, best_epoch, best_keys = correct, epoch, keys.detach().clone()
        log.append(record)
    return best_keys, log, best_epoch


def fit_tip_adapter_f(task: HeadTask, *, prograd: bool = False) -> HeadResult:
    """Tip-Adapter-F (``prograd=True``: with ProGrad's projection of each step's gradient before AdamW)."""
    check_task(task, needs_val=True)
    keys, log, best_epoch = train_keys(task, cache_keys(task.train_views), prograd=prograd)
    chosen = search_alpha_beta(task, keys)
    test = normalize(task.test_features)
    with torch.no_grad():
        logits = tip_logits(test, keys, task.train_labels, task, chosen["alpha"], chosen["beta"])
    alpha, beta = INIT_ALPHA_BETA.get(task.config.dataset, INIT_ALPHA_BETA[FALLBACK_DATASET])
    metrics = {
        **chosen,
        "best_epoch": best_epoch,
        "epoch_selection": "val",
        "train_alpha": alpha,
        "train_beta": beta,
        "views_averaged": min(task.train_views.shape[1], CACHE_VIEWS),
    }
    return finish(task, logits, metrics, log, {"cache_keys": keys, "cache_labels": task.train_labels})


def fit_tip_adapter_f_prograd(task: HeadTask) -> HeadResult:
    return fit_tip_adapter_f(task, prograd=True)
