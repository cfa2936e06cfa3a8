"""CLAP: a linear probe with a class-adaptive penalty towards the zero-shot prototypes (Silva-Rodriguez et al.,
CVPR 2024, "A Closer Look at the Few-Shot Adaptation of Large Vision-Language Models"), as its release runs it
(jusiro/CLAP: ``trainers/adapters.py`` with ``INIT=ZS``, ``CONSTRAINT=l2``, ``configs/trainers/SGD_lr1e-1_B256_ep300``).

The maths. Prototypes W (K, D) start at the zero-shot prototypes T; ``logits = logit_scale * f normalise(W)^T`` for
normalised features f. The training set is every augmented view of every training image (the release extracts 20
augmented passes; one sample each). The multiplier of class k is the zero-shot model's mean softmax probability of
class k over the training samples of class k,

    lambda_k = mean over {i : y_i = k} of softmax(logit_scale * f_i T^T)_k,

fixed during training (the ``l2`` constraint; the release's ``adaptative`` variant, which updates them, is not its CLAP
setting). The loss of a batch is

    CE(logits, y) + mean_k lambda_k ||W_k - T_k||^2.

Optimiser and schedule (the release's Dassl config): SGD lr 0.1, momentum 0.9, no weight decay, batch 256, 300 epochs,
a constant warm-up epoch at 1e-5, then cosine per epoch (``fastprompt.train.config.learning_rate``). An epoch shuffles
all n * V samples and takes ``iterations_per_epoch(n, 256)`` batches of 256 of them (the release's number of batches is
that of its image loader, which drops the last partial batch when n >= 256). The model after the last epoch is
evaluated.

Where fastprompt departs from the release: the prototypes start at the L2-normalised zero-shot classifier of the task
(the release keeps the text features unnormalised; the logits are the same, the penalty and the step are measured in
units of the text feature's norm instead); the V cached views (RandomResizedCrop scale (0.08, 1) and flip, as the
release's Dassl transform) stand in for its 20 augmented passes; the permutation comes from the run's generator.
"""

from __future__ import annotations

import torch

from fastprompt.heads.common import finish, normalize, require_every_class, train_sgd
from fastprompt.heads.linear import cosine_gradients, cosine_logits
from fastprompt.heads.task import HeadResult, HeadTask, check_task
from fastprompt.train.config import iterations_per_epoch


def class_multipliers(zero_shot: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) lambda_k: the mean zero-shot softmax probability of the true class over each class's samples.

    Args:
        zero_shot: (N, K) zero-shot logits of the training samples.
        labels: (N,) their labels (every class present).
    """
    true_class = zero_shot.softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, device=zero_shot.device).index_add_(0, labels, true_class)
    return sums / torch.bincount(labels, minlength=num_classes).float()


def fit_clap(task: HeadTask, *, prograd: bool = False) -> HeadResult:
    """CLAP (``prograd=True``: with ProGrad's projection of G_d, the gradient of CE + penalty, against the KL)."""
    check_task(task, needs_val=False)
    require_every_class(task, "CLAP")
    scale = float(task.logit_scale)
    n, num_views, dim = task.train_views.shape
    samples = normalize(task.train_views).reshape(-1, dim)  # sample i * V + v: view v of image i
    labels = task.train_labels.repeat_interleave(num_views)
    anchors = task.text_weights.float()
    # The zero-shot logits by the head's own forward with the zero-shot prototypes (as the release's logits_zs, from
    # its forward_lp): the multipliers' source and, per batch (the same shapes as the head's forward, so the head's
    # first logits equal them bit for bit and G_g is exactly zero until the head moves), ProGrad's teacher.
    multipliers = class_multipliers(cosine_logits({"weight": anchors}, samples, scale), labels, task.num_classes)
    unit_anchors = normalize(anchors)  # cosine_logits' normalisation, done once
    batch_size = task.config.batch_size
    iterations = iterations_per_epoch(n, batch_size)

    def batches(epoch: int):
        order = torch.randperm(samples.shape[0], generator=task.generator).to(samples.device)
        chosen = [order[i * batch_size : (i + 1) * batch_size] for i in range(iterations)]
        out = []
        for rows in chosen:
            features = samples[rows]
            teacher = scale * features @ unit_anchors.T if prograd else None
            out.append((features, labels[rows], teacher))
        return out

    gradients = cosine_gradients(scale, anchors, multipliers)
    trained, log = train_sgd(task, {"prototypes": anchors.clone()}, gradients, batches, prograd=prograd)
    with torch.no_grad():
        logits = cosine_logits({"weight": trained["prototypes"]}, normalize(task.test_features), scale)
    metrics = {"multiplier_mean": float(multipliers.mean()), "samples": int(samples.shape[0])}
    return finish(task, logits, metrics, log, {**trained, "multipliers": multipliers})


def fit_clap_prograd(task: HeadTask) -> HeadResult:
    return fit_clap(task, prograd=True)
