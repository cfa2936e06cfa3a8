"""CoCoOp and ProGrad on CoCoOp, trained on cached image features, batched over runs and images.

CoCoOp (conditional prompt learning) as the ProGrad release's copy of it runs (BeierZhu/Prompt-align,
`ProGrad.public/trainers/cocoop.py` and `configs/trainers/CoCoOp/rn50_c4_ep10_batch1_ctxv1.yaml`, the same trainer as
KaiyangZhou/CoOp's `trainers/cocoop.py` apart from the initialisation; PROTOCOL.md section 6c): a meta-net
Linear(D, D/16) - ReLU - Linear(D/16, W) maps the normalised image feature x (D,) to a bias pi(x) (W,) that is added
to every context vector, and image x is classified with the text features of its own prompts
[SOT, ctx + pi(x), class tokens]. Trained per run: five tensors, `ctx` (M, W) and the meta-net's two weights and biases
(named as in the release's state dict). Loss: cross-entropy averaged over the batch; SGD with momentum 0.9 and weight
decay 5e-4 on all five tensors (Dassl's optimizer has one parameter group); the per-epoch schedule of
`fastprompt.train.config.learning_rate`. The release trains in fp16; here the master copies are fp32.

`prograd_cocoop` applies ProGrad's rule to every trainable tensor separately (PROTOCOL.md section 1): G_d is the
gradient of the cross-entropy, G_g that of the soft cross-entropy to the zero-shot teacher (the dataset's hand-written
template, logits on the same image) from the same forward pass; where <G_d, G_g> < 0 for a tensor, that tensor's G_d
loses lambda times its component along that tensor's G_g. The ProGrad release has no CoCoOp variant; its
Dassl trainer (`prograd_backward_and_update`) projects each parameter tensor of the prompt learner separately, and
that is what is done here for the five tensors.

Batched and exact: each image's context is encoded once as the shared prefix of its K prompts (the PromptEncoder's
shared-prefix path, called with P x B contexts), so the text tower sees the prefix rows once per image plus each
class's suffix rows (name, ".", end-of-text), never B x K x 77 tokens. Per step:

1. every active run draws its batch (`RunState.next_batch`: its own permutation per epoch, one view per image);
2. the meta-net on the batch gives the per-image contexts (P, B, M, W); one encoder pass over all P x B of them;
3. per-run losses on the (P, B, K) logits, their gradients with respect to the text features, ONE batched
   vector-Jacobian product through the encoder for both cotangents, then through the meta-net (cheap);
4. the fused ProGrad + SGD update (`fastprompt.kernels.prograd_update`) over 5 segments per run of one flat buffer.

Our choices (not the release's): the meta-net's initial weights are nn.Linear's default initialisation drawn from a
generator seeded with the run's seed (`initial_parameters`), so a run does not depend on the global random state
and its data order (the RunState's generator) is that of a CoOp or ProGrad run of the same seed; the logged angle of
a prograd_cocoop step (`cos`, `conflicts`) is the mean over the run's five tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.kernels.prograd_update import prograd_update
from fastprompt.prompt import random_context
from fastprompt.templates import prograd_template, template_prefix
from fastprompt.train.engine import (
    SUM_COLUMNS,
    LockstepEngine,
    RunState,
    finite_rows,
    padded_batch,
    restore_flags,
    teacher_logits_of,
    update_step,
)
from fastprompt.train.memory import resolve_class_chunk
from fastprompt.zeroshot import accuracy

COCOOP_METHODS = ("cocoop", "prograd_cocoop")
# CoOp's CoCoOp configs initialise with "a photo of a" (KaiyangZhou/CoOp, configs/trainers/CoCoOp/*_ctxv1.yaml); the
# ProGrad release's copy uses the dataset's template instead and stops on an assertion where it has more words than
# n_ctx. Ours: fall back to CoOp's words there and record it (`init_fallback`).
FALLBACK_PREFIX = "a photo of a"
PARAMETER_NAMES = (
    "ctx",
    "meta_net.linear1.weight",
    "meta_net.linear1.bias",
    "meta_net.linear2.weight",
    "meta_net.linear2.bias",
)
EVAL_TOKEN_ROWS = 1 << 15  # text-tower rows per evaluation chunk (no grad): about 64 MiB per activation on RN50


@dataclass(frozen=True)
class ParameterLayout:
    """Shapes of one run's trainable tensors, in `PARAMETER_NAMES` order, as they follow each other in the run's
    piece of the flat buffer (one segment per tensor)."""

    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, n_ctx: int, width: int, feature_dim: int) -> ParameterLayout:
        hidden = feature_dim // 16
        if hidden < 1:
            raise FastPromptError(
                f"CoCoOp's meta-net has feature_dim // 16 hidden units, and the image features have {feature_dim} "
                "dimensions; use image features of 16 dimensions or more."
            )
        return cls(((n_ctx, width), (hidden, feature_dim), (hidden,), (width, hidden), (width,)))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P, S) flat pieces -> name -> (P, *shape) views."""
        pieces = flat.split(self.sizes, dim=-1)
        return {
            name: piece.reshape(*flat.shape[:-1], *shape)
            for name, piece, shape in zip(PARAMETER_NAMES, pieces, self.shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """name -> (*shape) tensors -> (S,) fp32."""
        for name, shape in zip(PARAMETER_NAMES, self.shapes, strict=True):
            if tuple(tensors[name].shape) != shape:
                raise FastPromptError(f"CoCoOp tensor '{name}' has shape {tuple(tensors[name].shape)}, not {shape}.")
        return torch.cat([tensors[name].detach().float().reshape(-1).cpu() for name in PARAMETER_NAMES])


def init_prefix(template: str, n_ctx: int) -> tuple[str, bool]:
    """CoCoOp's initialisation words for `template` and whether CoOp's "a photo of a" replaced them.

    The release initialises the last w context vectors with the template's words (w = its number of words, the rest
    X placeholders at zero) and asserts w <= n_ctx; where w > n_ctx this falls back to "a photo of a".

    Raises:
        FastPromptError: n_ctx cannot hold "a photo of a" either (n_ctx < 4 with a long template).
    """
    words = template_prefix(template)
    if len(words.split()) <= n_ctx:
        return words, False
    if len(FALLBACK_PREFIX.split()) > n_ctx:
        raise FastPromptError(
            f"The template '{template}' and the fallback '{FALLBACK_PREFIX}' have more words than n_ctx = {n_ctx}; "
            f"use n_ctx {len(FALLBACK_PREFIX.split())} or more, or random initialisation."
        )
    return FALLBACK_PREFIX, True


def cocoop_encoder(clip, classnames: list[str], template: str, n_ctx: int = 4, init: str = "template"):
    """The PromptEncoder of a CoCoOp group: prompts "X ... <init words> <class>." (`init_prefix`), or "X" * n_ctx
    placeholders for random initialisation."""
    from fastprompt.encoder import PromptEncoder

    prefix = init_prefix(template, n_ctx)[0] if init == "template" else None
    return PromptEncoder(clip, classnames, n_ctx=n_ctx, prompt_prefix=prefix)


def _linear_init(out_features: int, in_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation (`reset_parameters`: weight, then bias) drawn from `generator`."""
    weight = torch.empty(out_features, in_features)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features)
    return weight, torch.empty(out_features).uniform_(-bound, bound, generator=generator)


def initial_parameters(encoder, config, feature_dim: int) -> dict[str, torch.Tensor]:
    """A run's initial tensors, fp32 on the CPU, in the release's draw order under a generator seeded with
    `config.seed`: the context (template words, or normal with std 0.02 for `init="random"`), then the meta-net's
    linear1 and linear2 as nn.Linear initialises them."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        ctx = random_context(encoder.n_ctx, encoder.width, generator)
    else:
        if encoder.prompt_prefix is None:
            raise FastPromptError("Template initialisation needs an encoder built with the template's words.")
        ctx = encoder.initial_context("template").cpu()
    hidden = feature_dim // 16
    w1, b1 = _linear_init(hidden, feature_dim, generator)
    w2, b2 = _linear_init(encoder.width, hidden, generator)
    return dict(zip(PARAMETER_NAMES, (ctx, w1, b1, w2, b2), strict=True))


def conditioned_contexts(parts: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Each image's context ctx + pi(x): parts name -> (P, *shape), images (P, B, D) -> (P, B, M, W)."""
    w1, b1 = parts["meta_net.linear1.weight"], parts["meta_net.linear1.bias"]
    w2, b2 = parts["meta_net.linear2.weight"], parts["meta_net.linear2.bias"]
    hidden = torch.relu(images @ w1.transpose(1, 2) + b1[:, None])
    bias = hidden @ w2.transpose(1, 2) + b2[:, None]  # (P, B, W)
    return parts["ctx"][:, None] + bias[:, :, None]


class CocoopEngine:
    """Trains a group of CoCoOp / ProGrad-on-CoCoOp runs that share one PromptEncoder (LockstepEngine's interface).

    Args:
        encoder: the group's PromptEncoder (K classes), built by `cocoop_encoder`.
        features: (N, V, D) training image features (normalised here) in the rows that the runs' indices use.
        runs: the group's runs; `run.teacher` None (cocoop) or a key of `teachers` (prograd_cocoop).
        teachers: teacher key -> normalised zero-shot weights (K, E).
        logit_scale: the model's exp(logit_scale).
        class_chunk: classes per chunk for the memory-bounded path (None, a number or "auto").
        update_fn: the update implementation (default: the fused kernel, or its reference off CUDA).
        autocast_dtype: bf16/fp16 autocast of the text tower on CUDA (None: fp32).
        initial: per run, name -> initial tensor (default: `initial_parameters` of each run's config).
        template: the dataset's ProGrad template, to check the encoder's words and report `init_fallback`
            (default: `prograd_template` of the runs' dataset).
    """

    def __init__(
        self,
        encoder,
        features: torch.Tensor,
        runs: list[RunState],
        teachers: dict[str, torch.Tensor],
        logit_scale: float,
        class_chunk: int | str | None = None,
        update_fn: Callable = prograd_update,
        autocast_dtype: torch.dtype | None = None,
        *,
        initial: list[dict[str, torch.Tensor]] | None = None,
        template: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.features = F.normalize(features.to(self.device, torch.float32), dim=-1)
        self.num_views = features.shape[1]
        self.runs = runs
        self._check_runs(template)
        self.layout = ParameterLayout.build(encoder.n_ctx, encoder.width, features.shape[-1])
        self.segment = self.layout.size
        if initial is None:
            initial = [initial_parameters(encoder, run.config, features.shape[-1]) for run in runs]
        self.params = torch.stack([self.layout.flatten(tensors) for tensors in initial]).to(self.device).reshape(-1)
        self.momentum_buf = torch.zeros_like(self.params)
        self.first_step = torch.tensor([run.step == 0 for run in runs], device=self.device)
        self.teachers = {key: weights.to(self.device, torch.float32) for key, weights in teachers.items()}
        self.logit_scale = logit_scale
        cotangents = 2 if any(run.teacher is not None for run in runs) else 1
        batch_size = max((run.config.batch_size for run in runs), default=1)
        # Every image is one context of the encoder with a batch of one image.
        self.class_chunk = resolve_class_chunk(class_chunk, encoder, len(runs) * batch_size, cotangents, 1)
        self.update_fn = update_fn
        self.autocast_dtype = autocast_dtype
        self.sizes = torch.tensor(self.layout.sizes, dtype=torch.long, device=self.device)
        self.sums = torch.zeros(len(runs), len(SUM_COLUMNS), device=self.device)
        self.diverged = torch.zeros(len(runs), dtype=torch.bool, device=self.device)
        self.diverged_at = torch.zeros(len(runs), dtype=torch.long, device=self.device)

    def _check_runs(self, template: str | None) -> None:
        """Every run is a CoCoOp method with the encoder's n_ctx, and the encoder carries CoCoOp's initial words."""
        encoder = self.encoder
        if encoder.class_specific:
            raise FastPromptError(
                "CoCoOp learns one context shared by all classes; build the encoder without class_specific."
            )
        self.init_fallbacks = []
        for run in self.runs:
            config = run.config
            method = config.declaration  # fastprompt/methods.py: who trains the run, and how it updates
            if method.kind != "cocoop" or method.update not in ("sgd", "prograd"):
                raise FastPromptError(
                    f"CocoopEngine trains CoCoOp runs ({', '.join(COCOOP_METHODS)}), not '{config.method}'; "
                    "train it with LockstepEngine."
                )
            if config.n_ctx != encoder.n_ctx:
                raise FastPromptError(
                    f"Run {config.run_id} has n_ctx {config.n_ctx} but the encoder {encoder.n_ctx}; group by n_ctx."
                )
            fallback = False
            if config.init != "random":
                words, fallback = init_prefix(template or prograd_template(config.dataset), config.n_ctx)
                if encoder.prompt_prefix != words:
                    raise FastPromptError(
                        f"The encoder's prompt words {encoder.prompt_prefix!r} are not CoCoOp's initialisation "
                        f"{words!r} for run {config.run_id}; build the encoder with cocoop_encoder()."
                    )
            self.init_fallbacks.append(fallback)

    # -------------------------------------------------------------------------------------------- bookkeeping
    # The run bookkeeping is LockstepEngine's own, so that both engines report and fail runs identically.
    active = LockstepEngine.active
    collect = LockstepEngine.collect
    _autocast = LockstepEngine._autocast

    def _piece(self, index: int) -> slice:
        return slice(index * self.segment, (index + 1) * self.segment)

    def context(self, index: int) -> torch.Tensor:
        """Run `index`'s context (M, W), without the image-conditioned bias (a view of the flat buffer)."""
        return self.layout.split(self.params[self._piece(index)])["ctx"]

    def trained_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Run `index`'s trained tensors, name -> fp32 copy on the CPU (`PARAMETER_NAMES`)."""
        return {
            name: t.detach().cpu().clone() for name, t in self.layout.split(self.params[self._piece(index)]).items()
        }

    def metrics(self, index: int) -> dict:
        """What the run's result records about its initialisation: the words, and whether they are the fallback."""
        random_init = self.runs[index].config.init == "random"
        return {
            "init_prefix": None if random_init else self.encoder.prompt_prefix,
            "init_fallback": self.init_fallbacks[index],
        }

    def checkpoint(self, index: int) -> dict:
        """Run `index`'s part of the engine's state on the CPU (see LockstepEngine.checkpoint)."""
        piece = self._piece(index)
        return {
            "params": self.params[piece].cpu().clone(),
            "momentum": self.momentum_buf[piece].cpu().clone(),
            "first_step": bool(self.first_step[index]),
            "sums": self.sums[index].cpu().clone(),
            "diverged": bool(self.diverged[index]),
            "diverged_at": int(self.diverged_at[index]),
        }

    def restore(self, index: int, state: dict) -> None:
        """Put back what `checkpoint` returned."""
        piece = self._piece(index)
        if state["params"].numel() != self.segment:
            raise FastPromptError(
                f"The checkpoint holds {state['params'].numel()} CoCoOp parameters, this group's runs "
                f"{self.segment}; it was written for another model or n_ctx."
            )
        self.params[piece] = state["params"].reshape(-1).to(self.params)
        self.momentum_buf[piece] = state["momentum"].reshape(-1).to(self.params)
        self.first_step[index] = bool(state["first_step"])
        restore_flags(self, index, state)

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> list[int]:
        """One optimisation step of every active run; returns the indices of the runs that stepped."""
        active = self.active
        if not active:
            return []
        images, labels, mask = padded_batch(self, active)
        index = torch.tensor(active, device=self.device)
        # A diverged run (frozen until collected) joins the shared passes with zero parameters (LockstepEngine).
        params = torch.where(self.diverged[index][:, None], 0.0, self.params.view(len(self.runs), -1)[index])
        teacher_logits = teacher_logits_of(self, active, images)
        temperatures = torch.tensor([self.runs[i].config.temperature for i in active], device=self.device)
        grads, losses = self._gradients(params, images, labels, mask, teacher_logits, temperatures)
        self._update(active, grads, losses)
        return active

    def _gradients(self, params, images, labels, mask, teacher_logits, temperatures):
        """(G_d, G_g or None) each (P, S) in the flat layout, and per-run losses, from one forward pass."""
        num_cotangents = 2 if teacher_logits is not None else 1
        p, b = images.shape[:2]
        leaf = params.detach().requires_grad_(True)
        contexts = conditioned_contexts(self.layout.split(leaf), images)  # (P, B, M, W)
        flat = contexts.detach().reshape(p * b, *contexts.shape[2:])
        k = self.encoder.num_classes
        chunks = [None]
        if self.class_chunk and self.class_chunk < k:
            chunks = self._class_chunks()
        with self._autocast():
            if chunks == [None]:
                context_leaf = flat.detach().requires_grad_(True)
                text = self.encoder(context_leaf)  # (P*B, K, E)
                per_image = text.detach().float().reshape(p, b, k, -1)
                cotangents, losses = _losses(
                    self.logit_scale, per_image, images, labels, mask, teacher_logits, temperatures
                )
                cot = cotangents[:num_cotangents].reshape(num_cotangents, p * b, k, -1).to(text.dtype)
                context_grads = torch.autograd.grad(text, context_leaf, cot, is_grads_batched=True)[0]
            else:
                with torch.no_grad():
                    text = torch.cat([self.encoder(flat, chunk) for chunk in chunks], dim=1)
                per_image = text.float().reshape(p, b, k, -1)
                cotangents, losses = _losses(
                    self.logit_scale, per_image, images, labels, mask, teacher_logits, temperatures
                )
                context_grads = torch.zeros(num_cotangents, *flat.shape, device=self.device)
                for chunk in chunks:
                    context_leaf = flat.detach().requires_grad_(True)
                    part = self.encoder(context_leaf, chunk)
                    cot = cotangents[:num_cotangents, :, :, chunk].reshape(num_cotangents, p * b, len(chunk), -1)
                    (grad,) = torch.autograd.grad(part, context_leaf, cot.to(part.dtype), is_grads_batched=True)
                    context_grads += grad
        context_grads = context_grads.float().view(num_cotangents, *contexts.shape)
        grads = [
            torch.autograd.grad(contexts, leaf, context_grads[c], retain_graph=c + 1 < num_cotangents)[0]
            for c in range(num_cotangents)
        ]
        return (grads[0], grads[1] if teacher_logits is not None else None), losses

    def _update(self, active: list[int], grads, losses: dict[str, torch.Tensor]) -> None:
        """Projection + SGD over 5 segments per active run; divergence handling as in LockstepEngine._update."""
        g_d, g_g = grads
        runs = [self.runs[i] for i in active]
        p, parts = len(active), len(PARAMETER_NAMES)
        index = torch.tensor(active, device=self.device)
        finite = finite_rows(losses["ce"], g_d) & ~self.diverged[index]
        if g_g is not None:
            finite &= finite_rows(losses["kl"], g_g)
            # A run without a teacher in a group with ProGrad runs gets G_g = 0: cos = conflicts = 0, as alone.
            has_teacher = torch.tensor([r.teacher is not None for r in runs], device=self.device)
            g_g = torch.where((finite & has_teacher)[:, None], g_g, 0.0)
        g_d = torch.where(finite[:, None], g_d, 0.0)
        table = self.params.view(len(self.runs), -1)
        momentum_table = self.momentum_buf.view(len(self.runs), -1)
        params, momentum_buf = table[index], momentum_table[index]  # (P, S) copies, updated in place below
        lam = [r.config.lam_used for r in runs]  # lambda for prograd_cocoop, 0 for cocoop
        lr = [r.schedule.lr_at(r.epoch) for r in runs]

        def per_segment(values) -> torch.Tensor:
            tensor = torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)
            return tensor.repeat_interleave(parts)

        offsets = torch.cat([self.sizes.new_zeros(1), self.sizes.repeat(p).cumsum(0)])
        stats = update_step(
            params.view(-1),
            momentum_buf.view(-1),
            g_d.reshape(-1).contiguous(),
            g_g.reshape(-1).contiguous() if g_g is not None else None,
            offsets,
            per_segment(lam),
            torch.where(finite, torch.tensor(lr, device=self.device), 0.0).float().repeat_interleave(parts),
            per_segment([r.config.momentum for r in runs]),
            per_segment([r.config.weight_decay for r in runs]),
            self.first_step[index].repeat_interleave(parts),
            self.update_fn,
        )
        kept = finite_rows(params)  # an update that left a tensor non-finite is not kept
        params = torch.where(kept[:, None], params, table[index])
        momentum_buf = torch.where(kept[:, None], momentum_buf, momentum_table[index])
        table[index], momentum_table[index] = params, momentum_buf
        bad = ~(finite & kept) & ~self.diverged[index]
        step_numbers = torch.tensor([r.step + 1 for r in runs]).to(self.device, non_blocking=True)
        self.diverged_at[index] = torch.where(bad, step_numbers, self.diverged_at[index])
        self.diverged[index] |= bad
        finite &= kept
        self.first_step[index] = False
        zeros = torch.zeros_like(losses["ce"])
        cos = stats.cos.float().view(p, parts).mean(dim=1) if g_g is not None else zeros
        conflicts = stats.conflict.float().view(p, parts).mean(dim=1) if g_g is not None else zeros
        columns = [losses["ce"], losses["correct"], losses["seen"], cos, conflicts]
        self.sums.index_add_(0, index, torch.stack([torch.where(finite, c, 0.0) for c in columns], dim=1))
        for run, rate in zip(runs, lr, strict=True):
            run.totals["steps"] = run.totals.get("steps", 0.0) + 1
            run.totals["lr"] = rate
            run.step += 1

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self, index: int, features: torch.Tensor, labels: torch.Tensor, encoder=None
    ) -> tuple[float, list, torch.Tensor]:
        """Run `index` on test images: every image gets its own context, in chunks of images (bounded memory).

        Args:
            features: (t, D) normalised test image features.
            labels: (t,) int64 labels in the class space of `encoder`.
            encoder: the PromptEncoder of the classes to tell apart (default: the training classes'; base-to-new
                passes the new classes' encoder, built with the same words and n_ctx).

        Returns:
            Accuracy in percent, per-class accuracies, and the predictions (t,) int64 on the CPU.
        """
        encoder = encoder or self.encoder
        parts = self.layout.split(self.params[self._piece(index)][None])
        k = encoder.num_classes
        rows_per_image = encoder.prefix_length + k * (encoder.truncated_length - encoder.prefix_length)
        step = max(1, EVAL_TOKEN_ROWS // rows_per_image)
        chunks = self._class_chunks(k) if self.class_chunk and self.class_chunk < k else [None]
        predictions = []
        for start in range(0, features.shape[0], step):
            images = features[start : start + step].to(self.device, torch.float32)
            contexts = conditioned_contexts(parts, images[None])[0]  # (c, M, W)
            with self._autocast():
                text = torch.cat([encoder(contexts, chunk) for chunk in chunks], dim=1)
            logits = torch.einsum("cd,ckd->ck", images, F.normalize(text.float(), dim=-1))
            predictions.append(logits.argmax(dim=-1).cpu())
        predictions = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
        overall, per_class = accuracy(predictions, labels, k)
        return overall, per_class, predictions

    def _class_chunks(self, k: int | None = None) -> list[torch.Tensor]:
        k = self.encoder.num_classes if k is None else k
        return [
            torch.arange(s, min(s + self.class_chunk, k), device=self.device) for s in range(0, k, self.class_chunk)
        ]


def _losses(scale, text, images, labels, mask, teacher_logits, temperatures):
    """Cotangents (2, P, B, K, E) of (sum of per-run CE, sum of per-run KL) w.r.t. per-image text features
    (P, B, K, E), and per-run losses; each run's losses are means over its (unpadded) batch."""
    leaf = text.detach().requires_grad_(True)
    logits = scale * torch.einsum("pbd,pbkd->pbk", images, F.normalize(leaf, dim=-1))
    count = mask.sum(dim=1)
    ce_rows = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(mask)
    ce = (ce_rows * mask).sum(dim=1) / count
    (cot_ce,) = torch.autograd.grad(ce.sum(), leaf, retain_graph=teacher_logits is not None)
    kl = torch.zeros_like(ce)
    cot_kl = torch.zeros_like(cot_ce)
    if teacher_logits is not None:
        t = temperatures[:, None, None]
        soft = -((teacher_logits / t).softmax(dim=-1) * (logits / t).log_softmax(dim=-1)).sum(dim=-1)
        kl = (soft * temperatures[:, None] ** 2 * mask).sum(dim=1) / count
        (cot_kl,) = torch.autograd.grad(kl.sum(), leaf)
    correct = ((logits.argmax(dim=-1) == labels).float() * mask).sum(dim=1)
    losses = {"ce": ce.detach(), "kl": kl.detach(), "correct": correct.detach(), "seen": count}
    return torch.stack([cot_ce, cot_kl]), losses


__all__ = [
    "COCOOP_METHODS",
    "FALLBACK_PREFIX",
    "PARAMETER_NAMES",
    "CocoopEngine",
    "ParameterLayout",
    "cocoop_encoder",
    "conditioned_contexts",
    "init_prefix",
    "initial_parameters",
]
