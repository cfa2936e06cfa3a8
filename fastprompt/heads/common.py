"""Pieces every head shares: normalised features, zero-shot logits, ProGrad's KL, batch samplers, the SGD loop.

The SGD loop keeps every trainable tensor of a head in one flat fp32 buffer, each tensor its own segment (offsets), and
updates it with ``fastprompt.kernels.prograd_update.prograd_update``: plain SGD (momentum, weight decay) without a
teacher gradient, ProGrad's per-segment projection and SGD with one (the kernel's docstring has the maths). Per step:
one forward pass of the head on the batch; G_d = gradient of the head's own training loss and, for ``+prograd``,
G_g = gradient of KL(p_zero-shot || p_head) at temperature 1 (PROTOCOL.md section 1), both from that forward pass.

``project`` gives heads trained by another optimizer (Tip-Adapter-F's AdamW) the same projection: the kernel run with
learning rate 0, momentum 0, no weight decay and a fresh momentum buffer leaves exactly the projected gradient
``G = G_d - lam * dot / ||G_g||^2 * G_g`` (where ``dot < 0`` and ``G_g != 0``, else ``G_d``) in that buffer, so the
rule is computed by the one implementation the prompt trainer uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.heads.task import HeadResult, HeadTask
from fastprompt.kernels.prograd_update import UpdateStats, prograd_update
from fastprompt.train.config import iterations_per_epoch, learning_rate
from fastprompt.zeroshot import accuracy

Batch = tuple[torch.Tensor, torch.Tensor]  # (B,) item indices, (B,) view indices


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 copy of (..., D) features."""
    return F.normalize(features.float(), dim=-1)


def zero_shot_logits(features_norm: torch.Tensor, task: HeadTask) -> torch.Tensor:
    """(N, K) logits of the zero-shot classifier: logit_scale * f @ text_weights^T for normalised f (N, D)."""
    return task.logit_scale * features_norm @ task.text_weights.float().T


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of sum_k -p_teacher(k) log p_student(k), (B, K) logits, temperature 1.

    Its gradient equals that of KL(p_teacher || p_student) (the teacher's entropy is a constant): ProGrad's L_kl, the
    same sum as the prompt trainer's ``_soft_ce_per_run`` at T = 1.
    """
    return -(teacher.softmax(dim=-1) * student.log_softmax(dim=-1)).sum(dim=-1).mean()


def finish(
    task: HeadTask, test_logits: torch.Tensor, metrics: dict, log: list[dict], state: dict[str, torch.Tensor]
) -> HeadResult:
    """The HeadResult of test logits (t, K): predictions (ties to the lowest class), accuracy, per-class accuracy."""
    predictions = test_logits.argmax(dim=-1).to(torch.int64).cpu()
    overall, per_class = accuracy(predictions, task.test_labels, task.num_classes)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    return HeadResult(overall, per_class, predictions, metrics, log, state)


def require_every_class(task: HeadTask, method: str) -> None:
    """Raise FastPromptError if a class has no training image (class means and per-class weights need one)."""
    counts = torch.bincount(task.train_labels.cpu(), minlength=task.num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise FastPromptError(
            f"{method} needs at least one training image per class, but class(es) {missing[:5]} have none; "
            "sample the few-shot subset from every class."
        )


# ------------------------------------------------------------------------------------------------ batch samplers
def coop_batches(num_items: int, num_views: int, batch_size: int, generator: torch.Generator) -> list[Batch]:
    """One epoch of (item indices, view indices) batches as the prompt trainer draws them.

    A fresh permutation of the items and one random view per item per epoch, both from ``generator`` (in that order,
    as ``fastprompt.train.engine.RunState.next_batch``); ``iterations_per_epoch`` batches of ``min(B, n)`` items (the
    last partial batch is dropped).
    """
    order = torch.randperm(num_items, generator=generator)  # on the generator's device (the CPU)
    views = torch.randint(num_views, (num_items,), generator=generator)
    size = min(batch_size, num_items)
    batches = []
    for iteration in range(iterations_per_epoch(num_items, batch_size)):
        chosen = order[iteration * size : (iteration + 1) * size]
        batches.append((chosen, views[chosen]))
    return batches


def all_item_batches(num_items: int, num_views: int, batch_size: int, generator: torch.Generator) -> list[Batch]:
    """One epoch over every item (the last batch may be short): a fresh permutation and one random view per item."""
    order = torch.randperm(num_items, generator=generator)
    views = torch.randint(num_views, (num_items,), generator=generator)
    return [(chosen, views[chosen]) for chosen in order.split(batch_size)]


# ----------------------------------------------------------------------------------------------- the SGD loop
def flat_layout(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat fp32 buffer of all tensors, (S+1,) int64 offsets): each tensor is one segment, in dict order."""
    sizes = [tensor.numel() for tensor in tensors.values()]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    flat = torch.cat([tensor.detach().float().reshape(-1) for tensor in tensors.values()]).contiguous()
    return flat, offsets


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` with the names and shapes of ``like`` (the inverse of ``flat_layout``)."""
    out, start = {}, 0
    for name, tensor in like.items():
        out[name] = flat[start : start + tensor.numel()].view(tensor.shape)
        start += tensor.numel()
    return out


def project(
    g_d: torch.Tensor, g_g: torch.Tensor, offsets: torch.Tensor, lam: float
) -> tuple[torch.Tensor, UpdateStats]:
    """ProGrad's projected gradient of every segment (module docstring), through the update kernel.

    Args:
        g_d: (N,) fp32 flat gradient of the head's own loss.
        g_g: (N,) fp32 flat gradient of the KL to the zero-shot teacher.
        offsets: (S+1,) int64 segment offsets.
        lam: the projection strength.

    Returns:
        The (N,) projected gradient and the kernel's per-segment statistics.
    """
    segments = offsets.numel() - 1
    zeros = torch.zeros(segments, dtype=torch.float32, device=g_d.device)
    scratch = torch.zeros_like(g_d)  # lr = 0: the parameter is not moved; it must only be finite
    projected = torch.empty_like(g_d)
    stats = prograd_update(
        scratch,
        projected,
        g_d.contiguous(),
        g_g.contiguous(),
        offsets,
        torch.full((segments,), float(lam), device=g_d.device),
        zeros,
        zeros,
        zeros,
        torch.ones(segments, dtype=torch.bool, device=g_d.device),
    )
    return projected, stats


class EpochStats:
    """Per-epoch sums of a trained head, turned into one log record."""

    def __init__(self) -> None:
        self.loss = self.correct = self.seen = self.steps = 0.0
        self.cos: list[float] = []
        self.conflicts: list[float] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, stats: UpdateStats | None) -> None:
        self.loss += float(loss)
        self.correct += float((logits.argmax(dim=-1) == labels).sum())
        self.seen += labels.numel()
        self.steps += 1
        if stats is not None:
            self.cos.extend(stats.cos.tolist())
            self.conflicts.extend(stats.conflict.float().tolist())

    def record(self, epoch: int, lr: float, prograd: bool) -> dict:
        """epoch, lr, loss (mean over steps), train_accuracy (percent of the samples seen) and, for +prograd, the mean
        G_d/G_g cosine and the share of conflicting updates over every (step, segment) of the epoch."""
        record = {
            "epoch": epoch,
            "lr": lr,
            "loss": self.loss / max(self.steps, 1),
            "train_accuracy": 100.0 * self.correct / max(self.seen, 1),
        }
        if prograd:
            record["cos_mean"] = sum(self.cos) / max(len(self.cos), 1)
            record["conflict_fraction"] = sum(self.conflicts) / max(len(self.conflicts), 1)
        return record


Gradients = Callable[
    [dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
]
"""(tensors, features (B, D), labels (B,), teacher logits (B, K) or None) -> (loss, logits (B, K), flat G_d,
flat G_g or None): one step's loss and gradients with respect to the flat buffer (``flat_layout``'s order)."""


def kl_cotangent(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, K) gradient of ``soft_cross_entropy(logits, teacher)`` with respect to the logits: (P - P_teacher) / B.

    Written as the difference of two softmaxes of the same kind, so it is exactly zero where the head's logits equal
    the teacher's: a head still at its zero-shot initialisation has G_g = 0 (no conflict), not rounding noise that the
    projection would act on.
    """
    return (logits.softmax(dim=-1) - teacher.softmax(dim=-1)) / logits.shape[0]


def ce_cotangent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) gradient of the batch-mean cross-entropy with respect to the logits: (P - onehot(y)) / B."""
    probs = logits.softmax(dim=-1)
    probs[torch.arange(labels.numel(), device=labels.device), labels] -= 1.0
    return probs / labels.numel()


def autograd_gradients(forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]) -> Gradients:
    """A step's gradients by autograd: one forward pass, both loss cotangents through ONE batched backward pass.

    G_d is the gradient of ``CE(forward(tensors, features), labels)``; with a teacher, G_g is the gradient of
    ``soft_cross_entropy(logits, teacher)`` (its logit cotangent ``kl_cotangent``).
    """

    def gradients(tensors, features, labels, teacher):
        leaf = flat_layout(tensors)[0].requires_grad_(True)
        current = unflatten(leaf, tensors)
        logits = forward(current, features)
        loss = F.cross_entropy(logits.detach(), labels)
        cotangents = [ce_cotangent(logits.detach(), labels)]
        if teacher is not None:
            cotangents.append(kl_cotangent(logits.detach(), teacher))
        (grads,) = torch.autograd.grad(logits, leaf, torch.stack(cotangents), is_grads_batched=True)
        return loss, logits.detach(), grads[0], grads[1] if teacher is not None else None

    return gradients


def train_sgd(
    task: HeadTask,
    tensors: dict[str, torch.Tensor],
    gradients: Gradients,
    epoch_batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]],
    *,
    prograd: bool,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Trains a head by SGD with momentum and weight decay (and ProGrad's projection), the learning rate per epoch.

    The rate of epoch e is ``learning_rate(e, E, lr, warmup_lr, warmup_epochs)`` from ``task.config`` (a constant
    warm-up, then cosine per epoch: the CoOp/Dassl schedule). Every step calls the update kernel once over the flat
    buffer of all tensors (one segment each).

    Args:
        task: the run (its config gives epochs, lr, warm-up, momentum, weight_decay and lam).
        tensors: name -> initial value; these are the trainable tensors.
        gradients: a step's loss and flat gradients (``autograd_gradients`` or a head's exact closed form).
        epoch_batches: epoch -> list of (features (B, D) normalised, labels (B,), teacher logits (B, K), or None
            when not ``prograd``) batches.
        prograd: project G_d against G_g (the ``+prograd`` variant); otherwise plain SGD on G_d.

    Returns:
        (the trained tensors, the per-epoch log).
    """
    config = task.config
    flat, offsets = flat_layout(tensors)
    segments = offsets.numel() - 1
    device = flat.device  # the per-segment values live with the buffer; the offsets may stay on the CPU
    momentum_buf = torch.zeros_like(flat)
    first_step = torch.ones(segments, dtype=torch.bool, device=device)
    lam = torch.full((segments,), float(config.lam) if prograd else 0.0, device=device)
    momentum = torch.full((segments,), float(config.momentum), device=device)
    weight_decay = torch.full((segments,), float(config.weight_decay), device=device)
    log = []
    for epoch in range(config.epochs):
        rate = learning_rate(epoch, config.epochs, config.lr, config.warmup_lr, config.warmup_epochs)
        lr = torch.full((segments,), float(rate), device=device)
        sums = EpochStats()
        for features, labels, teacher in epoch_batches(epoch):
            loss, logits, g_d, g_g = gradients(unflatten(flat, tensors), features, labels, teacher if prograd else None)
            stats = prograd_update(flat, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
            first_step.zero_()
            sums.add(loss, logits, labels, stats if prograd else None)
        log.append(sums.record(epoch, rate, prograd))
    return {name: value.clone() for name, value in unflatten(flat, tensors).items()}, log
