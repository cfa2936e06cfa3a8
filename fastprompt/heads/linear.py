"""Two linear heads on frozen, L2-normalised image features, trained on the prompt trainer's schedule.

- ``cosine``: a cosine classifier (the ProGrad paper's Table 6), ``logits = logit_scale * f normalise(W)^T``, W (K, D)
  randomly initialised.
- ``linear_sgd``: a plain linear probe, ``logits = logit_scale * (f W^T + b)``, trained by gradient (not CoOp's
  L-BFGS probe).

Both: cross-entropy, the CoOp schedule of ``task.config`` (SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32,
epochs by shots, a warm-up epoch at 1e-5, then cosine per epoch), the prompt trainer's sampler (a fresh permutation and
one random cached view per image per epoch, the last partial batch dropped), the update through the ProGrad kernel
(``+prograd``: projected against the KL to the zero-shot classifier). The model after the last epoch is evaluated.

fastprompt's choices (the paper gives no initialisation): the cosine classifier's rows are drawn from N(0, I) with the
run's generator and scaled to unit length (the length of the zero-shot prototypes it stands in for; the step size of a
cosine classifier scales with 1 / ||W||); its logit scale is CLIP's. The linear probe starts from the zero-shot
classifier, W = T and b = 0, with CLIP's logit scale as a fixed factor, so its first logits are CLIP's zero-shot logits
(``+prograd``'s teacher agrees with it at the start) and a step of the CoOp rate moves it as far as it moves the cosine
classifier; with W = logit_scale * T and no factor instead, the same rate leaves it at zero-shot (measured in
bench/bench_heads.py's setting: loss and accuracy unchanged after 20 epochs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.heads.common import (
    Gradients,
    autograd_gradients,
    ce_cotangent,
    coop_batches,
    finish,
    kl_cotangent,
    normalize,
    train_sgd,
    zero_shot_logits,
)
from fastprompt.heads.task import HeadResult, HeadTask, check_task


def cosine_logits(tensors: dict[str, torch.Tensor], features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, K) = logit_scale * features normalise(weight)^T for normalised features (B, D)."""
    return logit_scale * features @ normalize(tensors["weight"]).T


def cosine_gradients(
    scale: float, anchors: torch.Tensor | None = None, multipliers: torch.Tensor | None = None
) -> Gradients:
    """The exact closed-form step of a cosine head with weight W (K, D) (CLAP's when ``anchors`` are given).

    With r_k = ||W_k||, U = W / r, logits = s f U^T and P = softmax(logits) (B, K):

        dL_ce/dlogits = (P - onehot(y)) / B,     dL_kl/dlogits = (P - softmax(teacher)) / B   (``kl_cotangent``),
        dL/dU = s (dL/dlogits)^T f,               dL/dW_k = (dL/dU_k - U_k <dL/dU_k, U_k>) / r_k,

    both cotangents through ONE matrix product (2K, B) x (B, D); CLAP's penalty mean_k m_k ||W_k - A_k||^2 adds
    2 m_k (W_k - A_k) / K to G_d only. The same numbers as ``autograd_gradients`` (the tests compare the heads with
    plain autograd loops), without autograd's bookkeeping: this head's step is a few small products.
    """

    def gradients(tensors, features, labels, teacher):
        weight = tensors[next(iter(tensors))]
        norms = weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
        unit = weight / norms
        logits = scale * features @ unit.T
        loss = F.cross_entropy(logits, labels)
        cotangents = [ce_cotangent(logits, labels)]
        if teacher is not None:
            cotangents.append(kl_cotangent(logits, teacher))
        stacked = torch.cat([c.T for c in cotangents]) * scale  # (2K or K, B)
        grad_unit = (stacked @ features).view(len(cotangents), *weight.shape)
        grads = (grad_unit - unit * (grad_unit * unit).sum(dim=-1, keepdim=True)) / norms
        g_d = grads[0]
        if anchors is not None:
            difference = weight - anchors
            loss = loss + (multipliers * difference.square().sum(dim=-1)).mean()
            g_d = g_d + (2.0 / weight.shape[0]) * multipliers[:, None] * difference
        g_g = grads[1].reshape(-1) if teacher is not None else None
        return loss, logits, g_d.reshape(-1), g_g

    return gradients


def linear_logits(tensors: dict[str, torch.Tensor], features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, K) = logit_scale * (features weight^T + bias) for (B, D) features."""
    return logit_scale * torch.addmm(tensors["bias"], features, tensors["weight"].T)


def coop_epoch_batches(task: HeadTask, prograd: bool, teacher_fn=None):
    """epoch -> the prompt trainer's batches of (normalised view features, labels, teacher logits or None).

    ``teacher_fn`` maps a batch's (B, D) features to the teacher's (B, K) logits (default ``zero_shot_logits``); it
    runs per batch, on the same shapes as the head's own forward.
    """
    views = normalize(task.train_views)
    n, num_views, _ = views.shape
    teacher_fn = teacher_fn or (lambda features: zero_shot_logits(features, task))

    def batches(epoch: int):
        drawn = coop_batches(n, num_views, task.config.batch_size, task.generator)
        out = []
        for items, view in ((items.to(views.device), view.to(views.device)) for items, view in drawn):
            features = views[items, view]
            out.append((features, task.train_labels[items], teacher_fn(features) if prograd else None))
        return out

    return batches


def initial_cosine_weight(task: HeadTask) -> torch.Tensor:
    """(K, D) unit-length rows drawn from N(0, I) with the run's generator."""
    shape = task.text_weights.shape
    return normalize(torch.randn(shape, generator=task.generator)).to(task.text_weights.device)


def fit_cosine(task: HeadTask, *, prograd: bool = False) -> HeadResult:
    """The cosine classifier (``prograd=True``: with ProGrad's projection)."""
    check_task(task, needs_val=False)
    scale = float(task.logit_scale)
    weight = initial_cosine_weight(task)
    trained, log = train_sgd(
        task, {"weight": weight}, cosine_gradients(scale), coop_epoch_batches(task, prograd), prograd=prograd
    )
    with torch.no_grad():
        logits = cosine_logits(trained, normalize(task.test_features), scale)
    return finish(task, logits, {"init": "random"}, log, trained)


def fit_linear_sgd(task: HeadTask, *, prograd: bool = False) -> HeadResult:
    """The linear probe trained by SGD from the zero-shot classifier (``prograd=True``: with ProGrad's projection)."""
    check_task(task, needs_val=False)
    scale = float(task.logit_scale)
    weights = task.text_weights.float()
    initial = {"weight": weights.clone(), "bias": torch.zeros(task.num_classes, device=weights.device)}
    # The teacher's logits come from this head's own forward at its zero-shot start: logit_scale * f T^T up to
    # rounding, and bit for bit the head's first logits, so G_g is zero (not rounding noise) until the head moves.
    batches = coop_epoch_batches(task, prograd, lambda features: linear_logits(initial, features, scale))
    gradients = autograd_gradients(lambda tensors, features: linear_logits(tensors, features, scale))
    trained, log = train_sgd(task, initial, gradients, batches, prograd=prograd)
    with torch.no_grad():
        logits = linear_logits(trained, normalize(task.test_features), scale)
    return finish(task, logits, {"init": "zero_shot"}, log, trained)


def fit_cosine_prograd(task: HeadTask) -> HeadResult:
    return fit_cosine(task, prograd=True)


def fit_linear_sgd_prograd(task: HeadTask) -> HeadResult:
    return fit_linear_sgd(task, prograd=True)
