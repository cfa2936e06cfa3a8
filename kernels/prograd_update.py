r"""Fused ProGrad projection and SGD update over a flat buffer of many segments (DESIGN.md item 7).

The trainer keeps every trainable tensor of every run in one flat fp32 buffer of N elements, cut into S segments
(one per run and tensor) by int64 offsets: segment s is ``[offsets[s], offsets[s+1])``. Per segment s, with
``G_d`` the domain (cross-entropy) gradient and ``G_g`` the general-knowledge (KL) gradient of PROTOCOL.md section 1:

.. math::

    \mathrm{dot}_s = \langle G_d, G_g \rangle, \quad gg_s = \|G_g\|^2, \quad gd_s = \|G_d\|^2
    \qquad (\text{accumulated in fp32}),

    \mathrm{conflict}_s = (\mathrm{dot}_s < 0) \wedge (gg_s > 0), \qquad
    G = \begin{cases} G_d - \lambda_s \, \mathrm{dot}_s / gg_s \; G_g & \text{if conflict}_s \\
                      G_d & \text{otherwise,} \end{cases}

then exactly ``torch.optim.SGD(lr, momentum=m, dampening=0, nesterov=False, weight_decay=wd)`` on the projected G:

.. math::

    d = G + wd_s \, \theta, \qquad
    b \leftarrow \begin{cases} d & \text{first step (or } m_s = 0) \\ m_s b + d & \text{otherwise,} \end{cases}
    \qquad \theta \leftarrow \theta - lr_s \, b.

The test is strict (``dot < 0``, as in the paper's code); ``||G_g|| = 0`` counts as "no conflict", so there is never a
NaN (the paper's code divides by zero there). Weight decay is added after the projection, so it is not projected.
``cos_s = dot_s / (sqrt(gd_s) sqrt(gg_s))`` (0 where either norm is 0, clamped to [-1, 1]) is returned for the angle
statistics. Without ``G_g`` (CoOp, knowledge distillation) there is no projection and ``dot = gg = cos = 0``.

Shapes: ``param``, ``momentum_buf`` (N,) fp32; ``g_d``, ``g_g`` (N,) fp32, fp16 or bf16; ``offsets`` (S+1,) int64;
``lam``, ``lr``, ``momentum``, ``weight_decay`` (S,) fp32; ``first_step`` (S,) bool.

Scheme (docs/kernels.md gives the reasons): the segments are cut into chunks of ``tiles * BLOCK`` elements (at least one
chunk per segment, so an empty segment still gets its statistics written). Two launches over the same chunk grid:

1. ``_prograd_partials_kernel``: one program per chunk writes the chunk's three partial sums to a (3, chunks) buffer.
2. ``_prograd_apply_kernel``: one program per chunk re-reduces its segment's partials in a fixed order (so every program
   of a segment gets bit-identical sums, and the result does not depend on scheduling: no atomics), decides the
   projection, and updates its chunk of the parameters and momentum in place; the segment's first chunk writes the
   statistics.

A program finds its segment by a binary search over the cumulative chunk counts, so the grid does not depend on how the
lengths are distributed. The chunk length grows with sqrt(N) so that a segment never has more than ``CHUNK / 16``
partials: the redundant re-reduction then costs at most a few percent of the update's own memory traffic.

On CPU tensors without Triton, ``prograd_update_cpu`` does the same maths in plain PyTorch with as few passes as eager
operations allow: every run's copy of a short tensor is updated at once through a (runs, L) strided view, long segments
one at a time with dot products and in-place passes (its docstring and docs/kernels.md). ``prograd_update_ref`` stays
the plain vectorised reference that the tests compare everything with.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only (pyproject.toml); the reference serves everywhere else
    triton = None
    tl = None

__all__ = ["UpdateStats", "prograd_update", "prograd_update_cpu", "prograd_update_loop", "prograd_update_ref"]

GRADIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UpdateStats(NamedTuple):
    """Per-segment statistics of one update, all (S,): fp32 except ``conflict`` (bool)."""

    dot: torch.Tensor
    gg_sq: torch.Tensor
    gd_sq: torch.Tensor
    cos: torch.Tensor
    conflict: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Input checks (shared by every implementation)
# ---------------------------------------------------------------------------------------------------------------------


def _check_inputs(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step) -> int:
    """Validate shapes, dtypes, devices and contiguity; return the number of segments S. Raises ValueError."""

    def check(name, tensor, shape, dtypes, device):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name} must have dtype {allowed}, got {str(tensor.dtype).removeprefix('torch.')}")
        if device is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, but param is on {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    if not isinstance(param, torch.Tensor) or param.dim() != 1:
        raise ValueError(
            f"param must be a 1-D tensor (the flat parameter buffer), got {getattr(param, 'shape', param)}"
        )
    num_elements, device = param.numel(), param.device
    check("param", param, (num_elements,), (torch.float32,), None)
    check("momentum_buf", momentum_buf, (num_elements,), (torch.float32,), device)
    check("g_d", g_d, (num_elements,), GRADIENT_DTYPES, device)
    if g_g is not None:
        check("g_g", g_g, (num_elements,), (g_d.dtype,), device)
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be a 1-D tensor of S+1 >= 2 entries, got {getattr(offsets, 'shape', offsets)}")
    num_segments = offsets.numel() - 1
    if offsets.device.type != "cpu" and offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device}: it must be on the CPU or on param's device {device}")
    check("offsets", offsets, (num_segments + 1,), (torch.int64,), None)
    for name, tensor in (("lam", lam), ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        check(name, tensor, (num_segments,), (torch.float32,), device)
    check("first_step", first_step, (num_segments,), (torch.bool,), device)
    if param.data_ptr() == momentum_buf.data_ptr() and num_elements > 0:
        raise ValueError("param and momentum_buf must be different buffers")
    if offsets.device.type == "cpu":  # free to check here; on the GPU it would cost a synchronisation every step
        if int(offsets[0]) != 0 or int(offsets[-1]) != num_elements:
            raise ValueError(
                f"offsets must start at 0 and end at N = {num_elements}, got {int(offsets[0])} .. {int(offsets[-1])}"
            )
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
    return num_segments


def _segment_ids(offsets: torch.Tensor, num_elements: int, device: torch.device) -> torch.Tensor:
    """(N,) int64 segment index of every element."""
    offsets = offsets.to(device)
    lengths = offsets[1:] - offsets[:-1]
    segments = torch.arange(lengths.numel(), device=device)
    return torch.repeat_interleave(segments, lengths, output_size=num_elements)


def _decide(dot, gg_sq, gd_sq, lam):
    """Per-segment projection coefficient, cosine and conflict flag, all (S,) fp32 (the kernel does the same)."""
    conflict = (dot < 0) & (gg_sq > 0)
    # The quotients are computed everywhere and the entries without a conflict (or with a zero norm) masked to 0:
    # torch.where with Python scalars gives the same values but costs twice as much on the CPU.
    coef = (lam * dot / gg_sq).masked_fill_(~conflict, 0.0)
    norms = gd_sq.sqrt() * gg_sq.sqrt()
    cos = (dot / norms).masked_fill_(~(norms > 0), 0.0).clamp_(-1.0, 1.0)
    return coef, cos, conflict


# ---------------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------------


def prograd_update_ref(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step):
    """The update in plain PyTorch, vectorised over segments (the fallback off the GPU, and the tests' reference).

    The segment sums are accumulated in fp64 by ``torch.segment_reduce`` (deterministic, and more accurate than any
    fp32 order) and rounded to fp32; everything else is computed in fp32 with the same operations as
    ``torch.optim.SGD``.

    Args:
        param: (N,) fp32, updated in place.
        momentum_buf: (N,) fp32, updated in place.
        g_d: (N,) fp32/fp16/bf16 gradient of the domain (cross-entropy) loss.
        g_g: (N,) same dtype as g_d, gradient of the general-knowledge loss; None for no projection.
        offsets: (S+1,) int64, on the CPU or param's device.
        lam: (S,) fp32 projection strength.
        lr: (S,) fp32 learning rate.
        momentum: (S,) fp32.
        weight_decay: (S,) fp32.
        first_step: (S,) bool, True where the momentum buffer is not initialised yet.

    Returns:
        UpdateStats of (S,) tensors.
    """
    num_segments = _check_inputs(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    device = param.device
    offsets = offsets.to(device)
    segment = _segment_ids(offsets, param.numel(), device)

    def per_element(values: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, segment)

    def segment_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(values, "sum", offsets=offsets).float()

    grad64 = g_d.double()
    gd_sq = segment_sum(grad64 * grad64)
    if g_g is None:
        grad = g_d.float()
        dot, gg_sq, cos = (torch.zeros(num_segments, dtype=torch.float32, device=device) for _ in range(3))
        conflict = torch.zeros(num_segments, dtype=torch.bool, device=device)
    else:
        grad_g64 = g_g.double()
        dot, gg_sq = segment_sum(grad64 * grad_g64), segment_sum(grad_g64 * grad_g64)
        del grad64, grad_g64
        coef, cos, conflict = _decide(dot, gg_sq, gd_sq, lam)
        grad = torch.addcmul(g_d.float(), per_element(coef), g_g.float(), value=-1.0)
    direction = torch.addcmul(grad, per_element(weight_decay), param)
    restart = per_element(first_step | (momentum == 0))
    momentum_buf.copy_(torch.where(restart, direction, torch.addcmul(direction, per_element(momentum), momentum_buf)))
    param.addcmul_(per_element(lr), momentum_buf, value=-1.0)
    return UpdateStats(dot, gg_sq, gd_sq, cos, conflict)


def prograd_update_loop(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step):
    """The paper's way: a Python loop over segments (runs x tensors), separate PyTorch operations for each.

    Like the released code, the conflict test is a Python ``if`` on a device scalar (one synchronisation per segment)
    and the hyper-parameters are Python floats (converted once, up front). The benchmark's baseline (c); same
    arguments and results as ``prograd_update_ref``.
    """
    num_segments = _check_inputs(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    bounds = offsets.tolist()
    lams, lrs, momenta, decays, firsts = (t.tolist() for t in (lam, lr, momentum, weight_decay, first_step))
    stats = torch.zeros(4, num_segments, dtype=torch.float32, device=param.device)
    conflict = torch.zeros(num_segments, dtype=torch.bool, device=param.device)
    for s in range(num_segments):
        begin, end = bounds[s], bounds[s + 1]
        theta, buf, grad = param[begin:end], momentum_buf[begin:end], g_d[begin:end].float()
        stats[2, s] = torch.dot(grad, grad)
        if g_g is not None:
            grad_g = g_g[begin:end].float()
            dot, gg_sq = torch.dot(grad, grad_g), torch.dot(grad_g, grad_g)
            stats[0, s], stats[1, s] = dot, gg_sq
            norms = stats[2, s].sqrt() * gg_sq.sqrt()
            if norms > 0:
                stats[3, s] = (dot / norms).clamp(-1.0, 1.0)
            if dot < 0 and gg_sq > 0:
                conflict[s] = True
                grad = grad - (lams[s] * dot / gg_sq) * grad_g
        if decays[s] != 0:
            grad = grad.add(theta, alpha=decays[s])
        if firsts[s] or momenta[s] == 0:
            buf.copy_(grad)
        else:
            buf.mul_(momenta[s]).add_(grad)
        theta.add_(buf, alpha=-lrs[s])
    return UpdateStats(stats[0], stats[1], stats[2], stats[3], conflict)


# ---------------------------------------------------------------------------------------------------------------------
# The CPU path (no Triton): the reference's maths in the fewest passes that eager PyTorch allows
# ---------------------------------------------------------------------------------------------------------------------

# Which segments are updated a family at a time (every run's copy of one tensor: a few dozen operations whatever the
# number of rows, but the reductions write product temporaries) rather than one by one on the row path (about 14
# operations per segment: dot products, a host decision, four in-place passes with the segment still in cache, no
# temporary): families of at least 8 rows of segments shorter than 32768. Measured, 1 thread on the benchmark machine
# (family time / row time, docs/kernels.md): 4 rows, 1.07-1.11 below 32768; 8, 16 and 64 rows, 0.22-0.83 below 32768;
# from 32768 on, 1.03-1.36 at every row count.
CPU_FAMILY_MIN_ROWS = 8
CPU_ROW_MIN_LENGTH = 32768
# torch.dot (MKL) accumulates in a fixed set of fp32 lanes, so its relative error grows with L: measured 6e-7 for a
# sum of 131072 squares, 7.6e-6 for 1M (the suite's fp32 floor is 1e-5). Longer segments are cut into chunks of 131072
# whose dots are then added.
CPU_DOT_CHUNK = 131072
# PyTorch runs operations on fewer than 32768 elements (its grain size) on the calling thread, while MKL's dot spreads
# 8192 elements over every thread: slower (16384 elements: 3.5 us at 2 threads, 2.4 us at 1) and, when another job
# holds a core, a wait for a descheduled thread (12 ms instead of 2 us, measured on the shared 2-core machine).
# Shorter dots use PyTorch's multiply and sum (two operations, a temporary of at most 128 KB).
CPU_MKL_MIN_LENGTH = 32768
# A family's reductions write their products to a scratch of at most this many elements (1 MB of fp32), reused block
# by block: the reductions of 128 x 8192 took 0.73 ms, against 2.1 ms with one fresh 4 MB scratch (page faults).
CPU_REDUCE_BLOCK = 1 << 18


def _period(lengths: list[int]) -> int:
    """Smallest k dividing S with lengths[i + k] == lengths[i]: the buffer repeats k segment lengths S / k times."""
    num_segments = len(lengths)
    for period in range(1, num_segments):
        if num_segments % period == 0 and lengths[period:] == lengths[:-period]:
            return period
    return num_segments


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 dot product of two 1-D tensors: MKL's from CPU_MKL_MIN_LENGTH elements on, PyTorch's own below."""
    return torch.dot(a, b) if a.numel() >= CPU_MKL_MIN_LENGTH else torch.mul(a, b).sum()


def _segment_sums(grad: torch.Tensor, grad_g: torch.Tensor | None) -> list[float]:
    """One segment's [dot, gg_sq, gd_sq] as fp32 values (dot = gg_sq = 0 without G_g): dots over chunks of at most
    CPU_DOT_CHUNK elements, the chunks' dots added in fp32."""
    grads = grad.split(CPU_DOT_CHUNK) if grad.numel() > CPU_DOT_CHUNK else (grad,)
    if grad_g is None:
        terms = [_dot(part, part) for part in grads]
    else:
        grads_g = grad_g.split(CPU_DOT_CHUNK) if grad_g.numel() > CPU_DOT_CHUNK else (grad_g,)
        terms = [
            term
            for part, part_g in zip(grads, grads_g, strict=True)
            for term in (_dot(part, part_g), _dot(part_g, part_g), _dot(part, part))
        ]
    width = len(terms) // len(grads)
    if len(grads) == 1:
        sums = [term.item() for term in terms]
    else:
        sums = torch.stack(terms).view(-1, width).sum(0).tolist()
    return sums if grad_g is not None else [0.0, 0.0, *sums]


def _segment_step(theta, buf, grad, grad_g, sums, lam, lr, momentum, weight_decay, restart) -> list:
    """Row path: one segment's projection (decided on the host from its fp32 sums, by ``_decide``'s rule) and SGD step.

    Four in-place passes, no temporary: buf = g_d + m buf (g_d on a restart), buf -= coef g_g, buf += wd theta,
    theta -= lr buf. The coefficient and the cosine are computed in double from the fp32 sums (within an ulp or two of
    the fp32 ones). Returns [dot, gg_sq, gd_sq, cos, conflict].
    """
    dot, gg_sq, gd_sq = sums
    conflict = dot < 0 and gg_sq > 0
    if restart:
        buf.copy_(grad)
    else:
        torch.add(grad, buf, alpha=momentum, out=buf)
    if conflict:
        buf.add_(grad_g, alpha=-(lam * dot / gg_sq))
    if weight_decay != 0:
        buf.add_(theta, alpha=weight_decay)
    theta.add_(buf, alpha=-lr)
    norms = math.sqrt(gd_sq) * math.sqrt(gg_sq)
    cos = min(max(dot / norms, -1.0), 1.0) if norms > 0 else 0.0
    return [dot, gg_sq, gd_sq, cos, conflict]


def _family_sums(grad: torch.Tensor, grad_g: torch.Tensor | None, scratch: torch.Tensor) -> list[list[float]]:
    """[dot, gg_sq, gd_sq] of every row of a (rows, L) family: products into ``scratch``, then fp32 row sums (PyTorch's
    cascade summation: within about 1e-7 of the reference's fp64 sums), CPU_REDUCE_BLOCK elements at a time."""
    rows, length = grad.shape
    step = _block_rows(rows, length)
    sums = torch.zeros(rows, 3)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        part = grad[block]
        products = scratch[: part.numel()].view(part.shape)
        torch.mul(part, part, out=products)
        torch.sum(products, 1, out=sums[block, 2])
        if grad_g is not None:
            part_g = grad_g[block]
            torch.mul(part, part_g, out=products)
            torch.sum(products, 1, out=sums[block, 0])
            torch.mul(part_g, part_g, out=products)
            torch.sum(products, 1, out=sums[block, 1])
    return sums.tolist()


def _block_rows(rows: int, length: int) -> int:
    """Rows of a family reduced at once: at most CPU_REDUCE_BLOCK elements (at least one row)."""
    return max(1, min(rows, CPU_REDUCE_BLOCK // max(length, 1)))


def _row_factor(values: list[float], column: torch.Tensor) -> float | torch.Tensor:
    """A family's per-row factor: a Python float when every row has the same one, else the (rows, 1) column."""
    return values[0] if values.count(values[0]) == len(values) else column[:, None]


def _add_scaled_(target: torch.Tensor, factor: float | torch.Tensor, source: torch.Tensor, sign: float = 1.0) -> None:
    """target += sign * factor * source in place, for a float factor or a (rows, 1) column."""
    if isinstance(factor, float):
        target.add_(source, alpha=sign * factor)
    else:
        target.addcmul_(factor, source, value=sign)


def prograd_update_cpu(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step):
    """The update on the CPU without Triton: ``prograd_update_ref``'s maths and results, in far fewer passes.

    The flat buffer is read as S / k repeats of k segment lengths (k the smallest such period: 1 when every segment has
    the same length, the tensors per run when the runs share a layout, S otherwise). Segment j of every repeat belongs
    to family j, a (S / k, L_j) strided view of each flat tensor. A family of short segments is reduced and updated as
    a whole, its per-row factors broadcast from (rows, 1) columns (or Python floats when the rows share them); long
    segments, and families of fewer than CPU_FAMILY_MIN_ROWS rows, take the row path (``_segment_step``). Sums are fp32
    (cascade row sums, or dots over chunks); fp16 and bf16 gradients are upcast to fp32 once. The projection,
    first-step and weight-decay rules and the statistics are the reference's (``_decide``). Arguments, checks and
    results as ``prograd_update_ref``; ValueError on tensors that are not on the CPU.
    """
    num_segments = _check_inputs(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    if param.device.type != "cpu":  # it reads every segment's sums on the host: a synchronisation per segment elsewhere
        raise ValueError(f"prograd_update_cpu takes CPU tensors, got param on {param.device}")
    bounds = offsets.tolist()
    lengths = [end - begin for begin, end in zip(bounds[:-1], bounds[1:], strict=True)]
    period = _period(lengths)
    rows, row_stride = num_segments // period, bounds[period]
    if g_d.dtype != torch.float32:  # one upcast pass each: every sum and update below is fp32, as in the reference
        g_d = g_d.float()
        g_g = None if g_g is None else g_g.float()
    lams, lrs, momenta, decays = (values.tolist() for values in (lam, lr, momentum, weight_decay))
    restarts = [first or rate == 0 for first, rate in zip(first_step.tolist(), momenta, strict=True)]

    def family_view(tensor: torch.Tensor, j: int) -> torch.Tensor:
        return tensor.as_strided((rows, lengths[j]), (row_stride, 1), tensor.storage_offset() + bounds[j])

    families = [j for j in range(period) if rows >= CPU_FAMILY_MIN_ROWS and lengths[j] < CPU_ROW_MIN_LENGTH]
    scratch = torch.empty(max((_block_rows(rows, lengths[j]) * lengths[j] for j in families), default=0))
    sums: list = [None] * num_segments  # [dot, gg_sq, gd_sq] per segment, and [cos, conflict] on the row path
    for j in range(period):
        if j in families:
            sums[j::period] = _family_sums(family_view(g_d, j), None if g_g is None else family_view(g_g, j), scratch)
            continue
        for s in range(j, num_segments, period):
            begin, end = bounds[s], bounds[s + 1]
            grad, grad_g = g_d[begin:end], None if g_g is None else g_g[begin:end]
            sums[s] = _segment_step(
                param[begin:end], momentum_buf[begin:end], grad, grad_g, _segment_sums(grad, grad_g),
                lams[s], lrs[s], momenta[s], decays[s], restarts[s],
            )  # fmt: skip
    if not families:  # every decision was taken on the host: its statistics cost two tensors, not a vectorised pass
        dot, gg_sq, gd_sq, cos, conflict = zip(*sums, strict=True)
        dot, gg_sq, gd_sq, cos = torch.tensor([dot, gg_sq, gd_sq, cos], dtype=torch.float32).unbind()
        return UpdateStats(dot, gg_sq, gd_sq, cos, torch.tensor(conflict, dtype=torch.bool))

    dot, gg_sq, gd_sq = torch.tensor([[row[k] for row in sums] for k in range(3)], dtype=torch.float32).unbind()
    if g_g is None:
        coef, cos, conflict = None, torch.zeros_like(dot), torch.zeros(num_segments, dtype=torch.bool)
    else:
        coef, cos, conflict = _decide(dot, gg_sq, gd_sq, lam)
    conflicts = conflict.tolist()
    for j in families:
        theta, buf, grad = family_view(param, j), family_view(momentum_buf, j), family_view(g_d, j)
        restarted = [i for i in range(rows) if restarts[i * period + j]]
        if len(restarted) == rows:
            buf.copy_(grad)
        else:
            if restarted:  # zeroed, so that m * buf adds nothing (a first step's buffer may hold anything)
                buf.index_fill_(0, torch.tensor(restarted), 0.0)
            factor = _row_factor(momenta[j::period], momentum.view(rows, period)[:, j])
            if isinstance(factor, float):
                torch.add(grad, buf, alpha=factor, out=buf)
            else:
                torch.addcmul(grad, factor, buf, out=buf)
        if coef is not None and any(conflicts[j::period]):
            buf.addcmul_(coef.view(rows, period)[:, j, None], family_view(g_g, j), value=-1.0)
        if any(decays[j::period]):
            _add_scaled_(buf, _row_factor(decays[j::period], weight_decay.view(rows, period)[:, j]), theta)
        _add_scaled_(theta, _row_factor(lrs[j::period], lr.view(rows, period)[:, j]), buf, sign=-1.0)
    return UpdateStats(dot, gg_sq, gd_sq, cos, conflict)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

# 1024 fp32 lanes at 4 warps = 8 elements per thread, two 128-bit loads per tensor per tile: the usual streaming choice
# for memory-bound elementwise Triton kernels (Liger, Triton tutorials). Not tuned on a GPU yet (docs/kernels.md).
BLOCK = 1024
NUM_WARPS = 4
# Partials per re-reduction step: a segment has at most CHUNK / 16 partials (see _tiles_per_chunk), so 128 covers
# every segment of up to 2M elements in one step at BLOCK = 1024.
RBLOCK = 128
# A segment may have at most CHUNK / PARTIALS_RATIO chunks: each apply program re-reads 12 bytes per partial while it
# moves 24 bytes per element, so the redundant reads stay under 12 / (24 * 16) = 3 % of the update's traffic.
PARTIALS_RATIO = 16
# The launcher's allocator, a module attribute so that tests can poison fresh outputs with NaN.
_empty = torch.empty

if triton is not None:
    # Scalars that vary between calls must not be specialised (Triton specialises ints equal to 1 or divisible by 16,
    # which would compile a new kernel per value).
    _RUNTIME_SCALARS = ["num_segments", "num_elements", "partial_stride", "tiles", "search_steps"]

    @triton.jit
    def _find_segment(chunk, chunk_start_ptr, num_segments, search_steps, valid):
        """Index s of the segment holding `chunk`: chunk_start[s] <= chunk < chunk_start[s+1] (binary search)."""
        lo = chunk * 0
        hi = lo + num_segments
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            in_range = valid & (mid < num_segments)
            next_start = tl.load(chunk_start_ptr + mid + 1, mask=in_range, other=0)
            go_right = in_range & (chunk >= next_start)
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        return tl.minimum(lo, num_segments - 1)

    @triton.jit(do_not_specialize=_RUNTIME_SCALARS)
    def _prograd_partials_kernel(
        g_d_ptr,
        g_g_ptr,
        offsets_ptr,
        chunk_start_ptr,
        partials_ptr,
        num_segments,
        num_elements,
        partial_stride,
        tiles,
        search_steps,
        HAS_GG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Phase 1: partial sums (dot, gg, gd) of one chunk into partials[:, chunk]."""
        chunk = tl.program_id(0).to(tl.int64)
        valid = chunk < tl.load(chunk_start_ptr + num_segments)
        segment = _find_segment(chunk, chunk_start_ptr, num_segments, search_steps, valid)
        seg_begin = tl.load(offsets_ptr + segment, mask=valid, other=0)
        seg_end = tl.minimum(tl.load(offsets_ptr + segment + 1, mask=valid, other=0), num_elements)
        first_chunk = tl.load(chunk_start_ptr + segment, mask=valid, other=0)
        start = seg_begin + (chunk - first_chunk) * (tiles * BLOCK)
        lanes = tl.arange(0, BLOCK)
        acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
        acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
        acc_gd = tl.zeros([BLOCK], dtype=tl.float32)
        for tile in range(tiles):
            index = start + tile * BLOCK + lanes
            mask = valid & (index < seg_end)
            grad = tl.load(g_d_ptr + index, mask=mask, other=0.0).to(tl.float32)
            acc_gd += grad * grad
            if HAS_GG:
                grad_g = tl.load(g_g_ptr + index, mask=mask, other=0.0).to(tl.float32)
                acc_dot += grad * grad_g
                acc_gg += grad_g * grad_g
        tl.store(partials_ptr + chunk, tl.sum(acc_dot, axis=0), mask=valid)
        tl.store(partials_ptr + partial_stride + chunk, tl.sum(acc_gg, axis=0), mask=valid)
        tl.store(partials_ptr + 2 * partial_stride + chunk, tl.sum(acc_gd, axis=0), mask=valid)

    @triton.jit(do_not_specialize=_RUNTIME_SCALARS)
    def _prograd_apply_kernel(
        param_ptr,
        buf_ptr,
        g_d_ptr,
        g_g_ptr,
        offsets_ptr,
        chunk_start_ptr,
        partials_ptr,
        lam_ptr,
        lr_ptr,
        momentum_ptr,
        weight_decay_ptr,
        first_step_ptr,
        stats_ptr,
        conflict_ptr,
        num_segments,
        num_elements,
        partial_stride,
        tiles,
        search_steps,
        HAS_GG: tl.constexpr,
        BLOCK: tl.constexpr,
        RBLOCK: tl.constexpr,
    ):
        """Phase 2: the segment's sums (fixed-order re-reduction), the projection and SGD on one chunk."""
        chunk = tl.program_id(0).to(tl.int64)
        valid = chunk < tl.load(chunk_start_ptr + num_segments)
        segment = _find_segment(chunk, chunk_start_ptr, num_segments, search_steps, valid)
        seg_begin = tl.load(offsets_ptr + segment, mask=valid, other=0)
        seg_end = tl.minimum(tl.load(offsets_ptr + segment + 1, mask=valid, other=0), num_elements)
        first_chunk = tl.load(chunk_start_ptr + segment, mask=valid, other=0)
        end_chunk = tl.load(chunk_start_ptr + segment + 1, mask=valid, other=0)

        # Every program of the segment runs this identical loop, so all of them get the same bits.
        rlanes = tl.arange(0, RBLOCK)
        acc_dot = tl.zeros([RBLOCK], dtype=tl.float32)
        acc_gg = tl.zeros([RBLOCK], dtype=tl.float32)
        acc_gd = tl.zeros([RBLOCK], dtype=tl.float32)
        for base in range(0, end_chunk - first_chunk, RBLOCK):
            part = first_chunk + base + rlanes
            mask = valid & (part < end_chunk)
            acc_dot += tl.load(partials_ptr + part, mask=mask, other=0.0)
            acc_gg += tl.load(partials_ptr + partial_stride + part, mask=mask, other=0.0)
            acc_gd += tl.load(partials_ptr + 2 * partial_stride + part, mask=mask, other=0.0)
        dot = tl.sum(acc_dot, axis=0)
        gg_sq = tl.sum(acc_gg, axis=0)
        gd_sq = tl.sum(acc_gd, axis=0)

        lam = tl.load(lam_ptr + segment, mask=valid, other=0.0)
        conflict = (dot < 0.0) & (gg_sq > 0.0)
        # IEEE division and square root (Triton's `/` and tl.sqrt are approximate), to match the reference.
        coef = tl.where(conflict, tl.math.div_rn(lam * dot, tl.where(gg_sq > 0.0, gg_sq, 1.0)), 0.0)
        norms = tl.sqrt_rn(gd_sq) * tl.sqrt_rn(gg_sq)
        cos = tl.where(norms > 0.0, tl.math.div_rn(dot, tl.where(norms > 0.0, norms, 1.0)), 0.0)
        cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
        writes_stats = valid & (chunk == first_chunk)
        tl.store(stats_ptr + segment, dot, mask=writes_stats)
        tl.store(stats_ptr + num_segments + segment, gg_sq, mask=writes_stats)
        tl.store(stats_ptr + 2 * num_segments + segment, gd_sq, mask=writes_stats)
        tl.store(stats_ptr + 3 * num_segments + segment, cos, mask=writes_stats)
        tl.store(conflict_ptr + segment, conflict.to(tl.uint8), mask=writes_stats)

        lr = tl.load(lr_ptr + segment, mask=valid, other=0.0)
        momentum = tl.load(momentum_ptr + segment, mask=valid, other=0.0)
        weight_decay = tl.load(weight_decay_ptr + segment, mask=valid, other=0.0)
        restart = (tl.load(first_step_ptr + segment, mask=valid, other=1) != 0) | (momentum == 0.0)
        start = seg_begin + (chunk - first_chunk) * (tiles * BLOCK)
        lanes = tl.arange(0, BLOCK)
        for tile in range(tiles):
            index = start + tile * BLOCK + lanes
            mask = valid & (index < seg_end)
            grad = tl.load(g_d_ptr + index, mask=mask, other=0.0).to(tl.float32)
            if HAS_GG:
                grad_g = tl.load(g_g_ptr + index, mask=mask, other=0.0).to(tl.float32)
                grad = grad - coef * grad_g
            theta = tl.load(param_ptr + index, mask=mask, other=0.0)
            buf = tl.load(buf_ptr + index, mask=mask, other=0.0)
            direction = grad + weight_decay * theta
            buf = tl.where(restart, direction, momentum * buf + direction)
            tl.store(buf_ptr + index, buf, mask=mask)
            tl.store(param_ptr + index, theta - lr * buf, mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------------


def _tiles_per_chunk(num_elements: int, block: int) -> int:
    """Tiles per chunk: CHUNK >= sqrt(PARTIALS_RATIO * N), so no segment has more than CHUNK / 16 partials."""
    return max(1, -(-math.isqrt(PARTIALS_RATIO * num_elements) // block))


def _launch(
    param,
    momentum_buf,
    g_d,
    g_g,
    offsets,
    lam,
    lr,
    momentum,
    weight_decay,
    first_step,
    *,
    block: int = BLOCK,
    rblock: int = RBLOCK,
    tiles: int | None = None,
) -> UpdateStats:
    """Check the inputs, plan the chunk grid and run the two kernels. `block`, `rblock`, `tiles` are for tests."""
    if triton is None:
        raise RuntimeError("triton is not installed; use prograd_update_ref")
    num_segments = _check_inputs(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    num_elements, device = param.numel(), param.device
    tiles = tiles if tiles is not None else _tiles_per_chunk(num_elements, block)
    chunk_len = tiles * block
    # The plan: chunk_start[s] = chunks before segment s (at least one chunk per segment). Computed where the offsets
    # are; on the CPU the exact grid is known, on the GPU an upper bound avoids a synchronisation.
    lengths = offsets[1:] - offsets[:-1]
    chunks = torch.clamp_min(torch.div(lengths + (chunk_len - 1), chunk_len, rounding_mode="floor"), 1)
    chunk_start = torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)])
    if offsets.device.type == "cpu":
        grid = int(chunk_start[-1])
    else:
        grid = -(-num_elements // chunk_len) + num_segments
    chunk_start = chunk_start.to(device, non_blocking=True)
    offsets = offsets.to(device, non_blocking=True)

    partials = _empty(3, grid, dtype=torch.float32, device=device)
    stats = _empty(4, num_segments, dtype=torch.float32, device=device)
    conflict = _empty(num_segments, dtype=torch.uint8, device=device)
    has_gg = g_g is not None
    g_g_arg = g_g if has_gg else g_d  # never read when HAS_GG is False
    search_steps = num_segments.bit_length()
    _prograd_partials_kernel[(grid,)](
        g_d, g_g_arg, offsets, chunk_start, partials,
        num_segments, num_elements, grid, tiles, search_steps,
        HAS_GG=has_gg, BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    _prograd_apply_kernel[(grid,)](
        param, momentum_buf, g_d, g_g_arg, offsets, chunk_start, partials,
        lam, lr, momentum, weight_decay, first_step.view(torch.uint8), stats, conflict,
        num_segments, num_elements, grid, tiles, search_steps,
        HAS_GG=has_gg, BLOCK=block, RBLOCK=rblock, num_warps=NUM_WARPS,
    )  # fmt: skip
    return UpdateStats(stats[0], stats[1], stats[2], stats[3], conflict.view(torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return triton is not None and type(_prograd_apply_kernel).__name__ == "InterpretedFunction"


def use_triton(device: torch.device) -> bool:
    """Whether `prograd_update` runs the Triton kernels for tensors on `device`."""
    if triton is None:
        return False
    if device.type == "cuda":
        return not _kernels_interpreted()
    return os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted()


def prograd_update(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step) -> UpdateStats:
    """ProGrad's projection and SGD step for every segment of a flat buffer, in place (module docstring: the maths).

    Runs the fused Triton kernels on CUDA tensors and under ``TRITON_INTERPRET=1`` (on the CPU), ``prograd_update_cpu``
    on other CPU tensors, and ``prograd_update_ref`` elsewhere. Deterministic: the same inputs give the same bits.

    Args:
        param: (N,) fp32 contiguous flat buffer of all runs' trainable tensors, updated in place.
        momentum_buf: (N,) fp32, updated in place (its content is ignored where ``first_step``).
        g_d: (N,) fp32, fp16 or bf16 gradient of the domain (cross-entropy) loss.
        g_g: (N,) same dtype as ``g_d``, gradient of the general-knowledge loss; None for plain SGD (CoOp, KD).
        offsets: (S+1,) int64, ``offsets[0] = 0``, ``offsets[-1] = N``; on the CPU (then also checked) or on
            param's device.
        lam: (S,) fp32 projection strength per segment.
        lr: (S,) fp32 learning rate per segment.
        momentum: (S,) fp32 per segment.
        weight_decay: (S,) fp32 per segment (added after the projection).
        first_step: (S,) bool, True where the segment's momentum buffer is not initialised yet.

    Returns:
        UpdateStats: ``dot``, ``gg_sq``, ``gd_sq``, ``cos`` (S,) fp32 and ``conflict`` (S,) bool.

    Raises:
        ValueError: on a wrong shape, dtype, device, contiguity or (CPU) offsets.
    """
    if use_triton(param.device):
        return _launch(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    if param.device.type == "cpu":
        return prograd_update_cpu(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
    return prograd_update_ref(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
