"""The lock-step engine: many prompt runs of one dataset trained together (DESIGN.md items 5-8).

Runs whose prompts share a layout (same template prefix, n_ctx, class position and classes) stack their contexts into
one (P, M, W) tensor, so one PromptEncoder pass serves all of them. Each run keeps its own few-shot subset, data order
and views (its own generator), schedule, optimizer state, projection and metrics, so a run trained here equals the same
run trained alone. Per step:

1. every active run draws its batch (its own permutation per epoch, one cached view per image and epoch);
2. one encoder forward for all contexts; per-run student logits, CE loss and, where needed, the KL to the teacher;
3. the two loss gradients with respect to the text features (cheap), then ONE batched vector-Jacobian product through
   the encoder for both cotangents (G_d and G_g of the same forward pass);
4. `update_step`: the fused ProGrad projection + SGD over every run's segment of the flat parameter buffer.

With a class chunk size, step 2-3 run a no-grad pass for all classes (features and loss cotangents), then a recomputed
forward and its backward per chunk of classes: exact, with memory set by the chunk, not by K.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastprompt.kernels.prograd_update import UpdateStats, prograd_update
from fastprompt.train.config import RunConfig, Schedule
from fastprompt.train.memory import resolve_class_chunk

SUM_COLUMNS = ("loss", "correct", "seen", "cos", "conflicts")


@dataclass
class RunState:
    """One run inside the engine: its data, schedule, generator, position and per-epoch records."""

    config: RunConfig
    train_index: torch.Tensor  # (n,) int64 rows of the engine's training features
    labels: torch.Tensor  # (n,) int64 labels in the run's class space
    schedule: Schedule
    generator: torch.Generator
    teacher: str | None = None  # key of the teacher weights (None: no KL term)
    anchor: str | None = None  # key of the hand-crafted class text features KgCoOp pulls towards (None: none)
    step: int = 0
    order: torch.Tensor | None = None  # this epoch's permutation of the run's items
    views: torch.Tensor | None = None  # this epoch's view index per item
    log: list[dict] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    reason: str | None = None
    divergence: dict | None = None  # a failed run's {"step", "epoch", "detected_at_step"} (result.json)

    @property
    def epoch(self) -> int:
        return self.step // self.schedule.iterations

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.total_steps

    def next_batch(self, num_views: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(item rows, view indices, labels) of this step's batch; draws a new order and views at epoch start."""
        iteration = self.step % self.schedule.iterations
        if iteration == 0 or self.order is None:
            n = self.train_index.numel()
            self.order = torch.randperm(n, generator=self.generator)
            self.views = torch.randint(num_views, (n,), generator=self.generator)
        size = min(self.config.batch_size, self.train_index.numel())
        chosen = self.order[iteration * size : (iteration + 1) * size]
        return self.train_index[chosen], self.views[chosen], self.labels[chosen]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "order": self.order,
            "views": self.views,
            "generator": self.generator.get_state(),
            "log": self.log,
            "totals": self.totals,
            "status": self.status,  # a run checkpointed at its end is written from its checkpoint after a kill
            "reason": self.reason,
            "divergence": self.divergence,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.order, self.views = state["order"], state["views"]
        self.generator.set_state(state["generator"])
        self.log, self.totals = state["log"], state["totals"]
        self.status, self.reason = state.get("status", "running"), state.get("reason")
        self.divergence = state.get("divergence")


def update_step(
    params: torch.Tensor,
    momentum_buf: torch.Tensor,
    g_d: torch.Tensor,
    g_g: torch.Tensor | None,
    offsets: torch.Tensor,
    lam: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    weight_decay: torch.Tensor,
    first_step: torch.Tensor,
    update_fn: Callable = prograd_update,
) -> UpdateStats:
    """The one place the update happens: the fused kernel (or its reference) over every run's segment, in place."""
    return update_fn(params, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)


class LockstepEngine:
    """Trains a group of runs that share one PromptEncoder.

    Args:
        encoder: the group's PromptEncoder (K classes).
        features: (N, V, D) training image features (normalised here) in the rows that the runs' indices use.
        runs: the group's runs with their initial contexts (M, W) in `contexts`.
        contexts: (P, M, W) initial contexts, fp32.
        teachers: teacher key -> normalised zero-shot weights (K, E).
        logit_scale: the model's exp(logit_scale).
        class_chunk: classes per chunk for the memory-bounded path (None: all at once; "auto": the largest chunk
            that fits in the device's free memory, fastprompt/train/memory.py).
        update_fn: the update implementation (default: the fused kernel, or its reference off CUDA).
        autocast_dtype: bf16/fp16 autocast on CUDA (None: fp32).
    """

    def __init__(
        self,
        encoder,
        features: torch.Tensor,
        runs: list[RunState],
        contexts: torch.Tensor,
        teachers: dict[str, torch.Tensor],
        logit_scale: float,
        class_chunk: int | str | None = None,
        update_fn: Callable = prograd_update,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.features = F.normalize(features.to(self.device, torch.float32), dim=-1)
        self.num_views = features.shape[1]
        self.runs = runs
        self.shape = tuple(contexts.shape[1:])
        self.params = contexts.detach().to(self.device, torch.float32).reshape(-1).clone()
        self.momentum_buf = torch.zeros_like(self.params)
        self.first_step = torch.tensor([run.step == 0 for run in runs], device=self.device)
        self.teachers = {key: weights.to(self.device, torch.float32) for key, weights in teachers.items()}
        self.logit_scale = logit_scale
        cotangents = 2 if any(run.teacher is not None for run in runs) else 1
        batch_size = max((run.config.batch_size for run in runs), default=1)
        self.class_chunk = resolve_class_chunk(class_chunk, encoder, len(runs), cotangents, batch_size)
        self.update_fn = update_fn
        self.autocast_dtype = autocast_dtype
        self.segment = math.prod(self.shape)
        self.sums = torch.zeros(len(runs), len(SUM_COLUMNS), device=self.device)  # per-run sums, read when logging
        self.diverged = torch.zeros(len(runs), dtype=torch.bool, device=self.device)
        self.diverged_at = torch.zeros(len(runs), dtype=torch.long, device=self.device)  # the run's first bad step

    # -------------------------------------------------------------------------------------------- bookkeeping
    @property
    def active(self) -> list[int]:
        return [i for i, run in enumerate(self.runs) if run.status == "running" and not run.done]

    def context(self, index: int) -> torch.Tensor:
        """Run `index`'s current context (M, W) (a view of the flat buffer)."""
        return self.params[index * self.segment : (index + 1) * self.segment].view(self.shape)

    def set_state(self, index: int, context: torch.Tensor, momentum_buf: torch.Tensor, first_step: bool) -> None:
        """Restore run `index`'s context, momentum buffer and first-step flag (from a checkpoint)."""
        piece = slice(index * self.segment, (index + 1) * self.segment)
        self.params[piece] = context.reshape(-1).to(self.params)
        self.momentum_buf[piece] = momentum_buf.reshape(-1).to(self.params)
        self.first_step[index] = first_step

    def momentum_of(self, index: int) -> torch.Tensor:
        return self.momentum_buf[index * self.segment : (index + 1) * self.segment].view(self.shape)

    def checkpoint(self, index: int) -> dict:
        """Run `index`'s part of the engine's state, on the CPU: context, momentum, first-step flag, and the sums and
        divergence flag not yet collected (kept as they are, so checkpointing never changes a logged number)."""
        return {
            "context": self.context(index).cpu().clone(),
            "momentum": self.momentum_of(index).cpu().clone(),
            "first_step": bool(self.first_step[index]),
            "sums": self.sums[index].cpu().clone(),
            "diverged": bool(self.diverged[index]),
            "diverged_at": int(self.diverged_at[index]),
        }

    def restore(self, index: int, state: dict) -> None:
        """Put back what `checkpoint` returned (a checkpoint without sums or flags: zero sums, not diverged)."""
        self.set_state(index, state["context"], state["momentum"], state["first_step"])
        restore_flags(self, index, state)

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> list[int]:
        """One optimisation step of every active run; returns the indices of the runs that stepped."""
        active = self.active
        if not active:
            return []
        images, labels, mask = padded_batch(self, active)
        contexts = torch.stack([self.context(i) for i in active])
        # A diverged run (frozen until it is collected) joins the shared passes with a zero context: whatever a
        # batched kernel does, its NaN or inf meets the other runs' numbers in one step at most.
        frozen = self.diverged[torch.tensor(active).to(self.device, non_blocking=True)]
        contexts = torch.where(frozen[:, None, None], 0.0, contexts)
        teacher_logits = teacher_logits_of(self, active, images)
        head = _Head(self, images, labels, mask, teacher_logits, [self.runs[i].config.temperature for i in active])
        distance = [self.runs[i].config.declaration.text_distance for i in active]
        if any(distance):  # KgCoOp: the learned class text features are pulled towards the hand-crafted ones
            anchors = torch.stack([self.teachers[self.runs[i].anchor or next(iter(self.teachers))] for i in active])
            head.text_distance = (torch.tensor(distance, device=self.device), anchors)
        grads, losses = self._gradients(contexts, head, teacher_logits is not None)
        self._update(active, grads, losses)
        return active

    def _gradients(self, contexts: torch.Tensor, head: _Head, with_teacher: bool):
        """(G_d, G_g or None) each (P, M, W), and per-run losses/accuracy, from one forward pass per class chunk."""
        num_cotangents = 2 if with_teacher else 1
        k = self.encoder.num_classes
        chunks = [None]
        if self.class_chunk and self.class_chunk < k:
            chunks = [
                torch.arange(s, min(s + self.class_chunk, k), device=self.device) for s in range(0, k, self.class_chunk)
            ]
        with self._autocast():
            if chunks == [None]:
                leaf = contexts.detach().requires_grad_(True)
                text = self.encoder(leaf)
                cotangents, losses = head(text.detach().float())
                grads = torch.autograd.grad(
                    text, leaf, cotangents[:num_cotangents].to(text.dtype), is_grads_batched=True
                )[0]
            else:
                with torch.no_grad():
                    text = torch.cat([self.encoder(contexts, chunk) for chunk in chunks], dim=1)
                cotangents, losses = head(text.float())
                grads = torch.zeros(num_cotangents, *contexts.shape, device=self.device)
                for chunk in chunks:
                    leaf = contexts.detach().requires_grad_(True)
                    part = self.encoder(leaf, chunk)
                    cot = cotangents[:num_cotangents, :, chunk].to(part.dtype)
                    grads += torch.autograd.grad(part, leaf, cot, is_grads_batched=True)[0]
        grads = grads.float()
        return (grads[0], grads[1] if with_teacher else None), losses

    def _update(self, active: list[int], grads, losses: dict[str, torch.Tensor]) -> None:
        """Projection + SGD for the active runs. No host synchronisation: a run whose loss, gradient or updated
        context is not finite keeps its context from before that step, is frozen from then on (zero steps), and is
        flagged with that step's number; the caller reads the flag when it closes the run's epoch (`collect`)."""
        g_d, g_g = grads
        runs = [self.runs[i] for i in active]
        index = torch.tensor(active, device=self.device)
        # A diverged run stays frozen (zero steps) until it is collected and leaves the group.
        finite = finite_rows(losses["ce"], g_d) & ~self.diverged[index]
        if g_g is not None:
            finite &= finite_rows(losses["kl"], g_g)
            alpha = torch.tensor([r.config.alpha_used for r in runs], device=self.device)
            if any(r.config.alpha_used for r in runs):  # the angle of the loss gradients, before KD mixes them
                raw_cos, raw_conflict = _angles(g_d, g_g)
            g_d = g_d + alpha[:, None, None] * g_g  # KD: one gradient of L_ce + alpha * L_kl (linearity), no projection
            g_g = torch.where(finite[:, None, None], g_g, 0.0)
        g_d = torch.where(finite[:, None, None], g_d, 0.0)
        # The active runs' segments are gathered into contiguous buffers, updated in place, scattered back.
        pieces = (index[:, None] * self.segment + torch.arange(self.segment, device=self.device)).reshape(-1)
        params, momentum_buf = self.params[pieces], self.momentum_buf[pieces]
        lam = [r.config.lam_used for r in runs]  # 0 for runs that do not project (CoOp with angles: G_g unused)
        lr = [r.schedule.lr_at(r.epoch) for r in runs]

        def per_run(values):
            return torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)

        offsets = torch.arange(len(active) + 1, dtype=torch.long, device=self.device) * self.segment
        stats = update_step(
            params,
            momentum_buf,
            g_d.reshape(-1).contiguous(),
            g_g.reshape(-1).contiguous() if g_g is not None else None,
            offsets,
            per_run(lam),
            torch.where(finite, per_run(lr), 0.0),
            per_run([r.config.momentum for r in runs]),
            per_run([r.config.weight_decay for r in runs]),
            self.first_step[index],
            self.update_fn,
        )
        # An update that left a context non-finite (an overflow, or a NaN from the update itself) is not kept.
        kept = finite_rows(params.view(len(active), -1))
        if not (kept_all := _all_true(kept)):
            kept_elements = kept.repeat_interleave(self.segment)
            params = torch.where(kept_elements, params, self.params[pieces])
            momentum_buf = torch.where(kept_elements, momentum_buf, self.momentum_buf[pieces])
        self.params[pieces], self.momentum_buf[pieces] = params, momentum_buf
        bad = ~(finite & kept) & ~self.diverged[index]  # newly diverged at this step (1-based: run.step + 1)
        step_numbers = torch.tensor([r.step + 1 for r in runs]).to(self.device, non_blocking=True)
        self.diverged_at[index] = torch.where(bad, step_numbers, self.diverged_at[index])
        self.diverged[index] |= bad
        finite = finite if kept_all else finite & kept
        self.first_step[index] = False
        zeros = torch.zeros_like(losses["ce"])
        cos = stats.cos.float() if g_g is not None else zeros
        conflicts = stats.conflict.float() if g_g is not None else zeros
        if g_g is not None and any(r.config.alpha_used for r in runs):
            mixed = alpha > 0
            cos, conflicts = torch.where(mixed, raw_cos, cos), torch.where(mixed, raw_conflict, conflicts)
        columns = [losses["ce"], losses["correct"], losses["seen"], cos, conflicts]
        self.sums.index_add_(0, index, torch.stack([torch.where(finite, c, 0.0) for c in columns], dim=1))
        for run, rate in zip(runs, lr, strict=True):
            run.totals["steps"] = run.totals.get("steps", 0.0) + 1
            run.totals["lr"] = rate
            run.step += 1

    def collect(self, index: int) -> bool:
        """Move run `index`'s device-side sums into its `totals` (a host synchronisation: call when logging or
        checkpointing) and mark it failed if it diverged. Returns whether it is still healthy."""
        sums = self.sums[index].tolist()
        self.sums[index] = 0.0
        run = self.runs[index]
        for key, value in zip(SUM_COLUMNS, sums, strict=True):
            run.totals[key] = run.totals.get(key, 0.0) + value
        if bool(self.diverged[index]) and run.status == "running":
            step = int(self.diverged_at[index])
            epoch = (step - 1) // run.schedule.iterations + 1
            run.status = "failed"
            run.divergence = {"step": step, "epoch": epoch, "detected_at_step": run.step}
            run.reason = (
                f"diverged: the loss, gradient or updated context became NaN/inf at step {step} (epoch {epoch}), "
                f"found at step {run.step}; the saved prompt is the context from before step {step}"
            )
        return run.status != "failed"

    def _autocast(self):
        if self.autocast_dtype is None or self.device.type != "cuda":
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)


def teacher_logits_of(engine, active: list[int], images: torch.Tensor) -> torch.Tensor | None:
    """(P, B, K) logits of each active run's teacher on its images, or None when no active run has a teacher (a run
    without one in a mixed group gets any teacher's: its G_g is unused)."""
    if not any(engine.runs[i].teacher is not None for i in active):
        return None
    teachers = engine.teachers
    weights = torch.stack([teachers[engine.runs[i].teacher or next(iter(teachers))] for i in active])
    return engine.logit_scale * images @ weights.transpose(1, 2)


def restore_flags(engine, index: int, state: dict) -> None:
    """Put back run `index`'s sums not yet logged and its divergence flag from a checkpoint (older checkpoints
    without them: zero sums, not diverged)."""
    if "sums" in state:
        engine.sums[index] = state["sums"].to(engine.sums)
    engine.diverged[index] = bool(state.get("diverged", False))
    engine.diverged_at[index] = int(state.get("diverged_at", 0))


def padded_batch(engine, active: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This step's batch of every active run of `engine` (its `runs`, `features` (N, V, D), `num_views`, `device`):
    images (P, B, D), labels (P, B) and mask (P, B), padded to the largest batch; padding rows are zero and masked out
    of every loss. The index tensors are built on the host and moved once."""
    batches = [engine.runs[i].next_batch(engine.num_views) for i in active]
    size = max(rows.numel() for rows, _, _ in batches)
    p = len(active)
    rows_pad = torch.zeros(p, size, dtype=torch.long)
    views_pad = torch.zeros(p, size, dtype=torch.long)
    labels_pad = torch.zeros(p, size, dtype=torch.long)
    mask = torch.zeros(p, size)
    for slot, (rows, views, run_labels) in enumerate(batches):
        n = rows.numel()
        rows_pad[slot, :n], views_pad[slot, :n], labels_pad[slot, :n], mask[slot, :n] = rows, views, run_labels, 1.0
    mask = mask.to(engine.device, non_blocking=True)
    labels = labels_pad.to(engine.device, non_blocking=True)
    images = engine.features[rows_pad.to(engine.device), views_pad.to(engine.device)] * mask[..., None]
    return images, labels, mask


def _angles(g_d: torch.Tensor, g_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per run (P,): cos(G_d, G_g) (0 where a norm is 0, as the update kernel's statistics) and the conflict flag."""
    dot = (g_d * g_g).flatten(1).sum(dim=1)
    norms = g_d.flatten(1).norm(dim=1) * g_g.flatten(1).norm(dim=1)
    cos = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0).clamp(-1.0, 1.0)
    return cos, ((dot < 0) & (norms > 0)).float()


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(P,) bool: whether row p of every tensor (each (P, ...)) is all finite: the divergence check of each step."""
    finite = torch.isfinite(tensors[0].flatten(1)).all(dim=1) if tensors[0].dim() > 1 else torch.isfinite(tensors[0])
    for tensor in tensors[1:]:
        finite &= torch.isfinite(tensor.flatten(1)).all(dim=1) if tensor.dim() > 1 else torch.isfinite(tensor)
    return finite


def _all_true(flags: torch.Tensor) -> bool:
    """Whether all flags are set, without a host synchronisation on CUDA (where it answers False, the safe side)."""
    return flags.device.type == "cpu" and bool(flags.all())


class _Head:
    """Per-run losses on the text features and their gradients (the cotangents for the encoder's VJP)."""

    def __init__(self, engine: LockstepEngine, images, labels, mask, teacher_logits, temperatures) -> None:
        self.engine, self.images, self.labels, self.mask = engine, images, labels, mask
        self.teacher_logits = teacher_logits
        self.temperatures = torch.tensor(temperatures, device=engine.device)
        self.text_distance: tuple[torch.Tensor, torch.Tensor] | None = None  # (P,) weights, (P, K, E) anchors

    def __call__(self, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cotangents (2, P, K, E) of (sum of per-run CE, sum of per-run KL) w.r.t. text (P, K, E), and losses."""
        leaf = text.detach().requires_grad_(True)
        logits = self.engine.logit_scale * torch.einsum("pbd,pkd->pbk", self.images, F.normalize(leaf, dim=-1))
        count = self.mask.sum(dim=1)
        ce_rows = F.cross_entropy(logits.flatten(0, 1), self.labels.flatten(), reduction="none").view_as(self.mask)
        ce = (ce_rows * self.mask).sum(dim=1) / count
        domain = ce
        if self.text_distance is not None:  # KgCoOp: w * (1 - mean over classes of cos(t_k, t0_k)), in G_d
            weights, anchors = self.text_distance
            domain = ce + weights * (1.0 - F.cosine_similarity(leaf, anchors, dim=-1, eps=1e-7).mean(dim=-1))
        (cot_ce,) = torch.autograd.grad(domain.sum(), leaf, retain_graph=self.teacher_logits is not None)
        kl = torch.zeros_like(ce)
        cot_kl = torch.zeros_like(cot_ce)
        if self.teacher_logits is not None:
            kl_rows = _soft_ce_per_run(logits, self.teacher_logits, self.temperatures)
            kl = (kl_rows * self.mask).sum(dim=1) / count
            (cot_kl,) = torch.autograd.grad(kl.sum(), leaf)
        correct = ((logits.argmax(dim=-1) == self.labels).float() * self.mask).sum(dim=1)
        losses = {"ce": ce.detach(), "kl": kl.detach(), "correct": correct.detach(), "seen": count}
        return torch.stack([cot_ce, cot_kl]), losses


def _soft_ce_per_run(student: torch.Tensor, teacher: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """sum_k -p_teacher(k) log p_student(k) at each run's temperature T, times T^2: (P, B, K) logits -> (P, B)."""
    t = temperatures[:, None, None]
    targets = (teacher / t).softmax(dim=-1)
    return -(targets * (student / t).log_softmax(dim=-1)).sum(dim=-1) * temperatures[:, None] ** 2
