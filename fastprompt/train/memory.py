"""The memory one engine step needs, and the class chunk that makes it fit (`--class-chunk auto`, DESIGN.md item 8).

With a class chunk c the engine runs a no-grad pass over all K classes (text features and loss cotangents), then per
chunk a recomputed forward with grad and its batched VJP. Chunking is exact, so c trades only speed for memory:
`auto_class_chunk` picks the largest c whose predicted peak, times `SAFETY` (1.25 on CUDA, 1.5 on the CPU), fits in
the device's free memory.

The model counts elements of 4 bytes, also under bf16/fp16 autocast (there it over-counts by up to 2x: the chunk is
smaller than it could be, never too large). A *row* is one token position of one run's prompt in the text tower. A
chunk of c classes for P runs is

- shared-prefix path: rows(c) = P x (Lp + S(c)), Lp the shared prefix (recomputed with every chunk), S(c) the most
  padded suffix tokens of any chunk of c consecutive classes, bucketed as the encoder buckets them;
- truncated path: P x c x L_cut (the chunk's longest prompt up to its end-of-text token);
- plain path: P x c x context_length.

Per row and layer the forward keeps for the backward (the weights are frozen, so a linear layer keeps no input: no
weight gradient is taken):

    saved = 2 W          the inputs of the two layer norms
          + 3 W          the fused query/key/value output of all rows (on the shared-prefix path the prefix's keys
                         and values that the suffixes attend to are views of it, so autograd keeps it whole)
          + 4 W          shared-prefix path only: the suffix attention's own copies (scaled and flattened queries,
                         reshaped keys and values); 1 W on the other paths (the scaled queries)
          + 2 H x keys   attention probabilities (softmax output, the prefix part's reshaped copy); keys = Lp + Ls
          + a F          the MLP activation: QuickGELU keeps its input and its sigmoid (a = 2), nn.GELU its input
                         (a = 1)

and once per row, 2 W: the embedded prompt rows and the concatenated rows that enter the first layer.

(W width, H heads, F MLP width). RN50's text tower (W 512, H 8, F 2048, 12 layers, Lp 17 with ProGrad's ImageNet
prefix, Ls up to 13): 18.1 W per row and layer by this count; counted with `saved_tensors_hooks`, 17.7 W at P = 1 and
14.8 W at P = 2 (where the prefix's keys and values are copied, not views); tests/test_memory.py holds the model
between 1 and 1.6 times the tiny model's count on both fast paths. The batched VJP carries C cotangents (2 for
ProGrad and KD, 1 for CoOp) back through one layer at a time; while a layer's MLP is differentiated it holds about

    transient = C x (3 F + 4 W)   per row (the hidden activation's gradient and its backward temporaries, the
                                  layer's input and output gradients)

Outside the chunk loop, for all K classes: the text features, their fp32 copy, the normalised features, two
cotangents and the normalisation's gradients, (6 + 2 C) x P x K x E, and the logits (P x B x K) four times:

    step(c) = 4 bytes x [fixed + rows(c) x (layers x saved + 2 W + transient)]

The persistent state (weights, cached features, contexts) is already allocated when the engine asks, so it is not
in the free figure. `bench/bench_memory.py` measures the peak of a real step against `step(c)`;
bench/results/README.md has the figures.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprompt.encoder import plan_buckets
from fastprompt.errors import FastPromptError, brief

# The predicted peak times SAFETY must fit. CUDA's caching allocator rounds and fragments a little; on the CPU the
# process's resident memory is what must fit, and the C allocator keeps freed blocks of earlier chunks: measured there
# (bench/results/README.md, "memory.csv"), RSS reached 1.19 x the model and 1.5 x the tensors' own peak.
SAFETY = {"cuda": 1.25, "cpu": 1.5}
BYTES = 4  # fp32 elements (also counted so under autocast: an over-estimate there)


@dataclass(frozen=True)
class StepMemory:
    """The model's parts for one chunk size, in bytes."""

    chunk: int
    rows_per_run: int  # token rows of one run in the largest chunk
    saved: int  # activations kept for the backward, all layers
    transient: int  # the batched VJP's live gradients in one layer
    fixed: int  # the all-class tensors outside the chunk loop

    @property
    def total(self) -> int:
        return self.saved + self.transient + self.fixed


def parse_class_chunk(value: str | int | None) -> int | str | None:
    """`--class-chunk`: None (all classes at once), a positive number of classes, or "auto".

    Raises:
        FastPromptError: anything else.
    """
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isascii() and text.isdigit() and int(text) >= 1:  # "²".isdigit() holds, int("²") fails
        return int(text)
    raise FastPromptError(f"--class-chunk must be a positive number of classes or 'auto', got {brief(value)}.")


def step_memory(encoder, runs: int, chunk: int, cotangents: int = 2, batch_size: int = 32) -> StepMemory:
    """The predicted peak of one engine step with classes in chunks of `chunk` (the module docstring's model).

    Args:
        encoder: the group's PromptEncoder (K classes).
        runs: P, the runs stepped together.
        chunk: classes per chunk (K or more: no chunking).
        cotangents: 2 when a run has a teacher (ProGrad, KD), else 1.
        batch_size: images per run and step.
    """
    tower = encoder.tower
    k = encoder.num_classes
    chunk = max(1, min(int(chunk), k))
    width, layers = tower.width, len(tower.blocks)
    first = tower.blocks[0]
    heads = first.attn.num_heads
    mlp_width = first.mlp.c_fc.out_features if hasattr(first.mlp, "c_fc") else 4 * width
    rows, keys = _rows_per_run(encoder, chunk)
    activation_copies = 1 if isinstance(getattr(first.mlp, "gelu", None), torch.nn.GELU) else 2  # QuickGELU: 2
    attention_copies = 4 if encoder.path == "shared_prefix" else 1
    saved = (5 + attention_copies) * width + activation_copies * mlp_width + 2 * heads * keys
    transient = cotangents * (3 * mlp_width + 4 * width)
    embed_dim = _embed_dim(tower, width)
    fixed = (6 + 2 * cotangents) * runs * k * embed_dim + 4 * runs * batch_size * k
    return StepMemory(
        chunk=chunk,
        rows_per_run=rows,
        saved=BYTES * runs * rows * (layers * saved + 2 * width),
        transient=BYTES * runs * rows * transient,
        fixed=BYTES * fixed,
    )


def auto_class_chunk(
    encoder, runs: int, cotangents: int = 2, batch_size: int = 32, free_bytes: int | None = None
) -> int | None:
    """The largest class chunk whose predicted step peak, times the device's SAFETY, fits in `free_bytes`.

    Args:
        encoder: the group's PromptEncoder.
        runs: P, the runs stepped together.
        cotangents: 2 when a run has a teacher, else 1.
        batch_size: images per run and step.
        free_bytes: the memory the step may use (default: `free_memory(encoder.device)`).

    Returns:
        None when all K classes fit at once (no chunking), else the chunk size (1 with a warning when even one
        class is predicted not to fit).
    """
    free = free_memory(encoder.device) if free_bytes is None else int(free_bytes)
    k = encoder.num_classes
    factor = safety(encoder.device)

    def fits(chunk: int) -> bool:
        return factor * step_memory(encoder, runs, chunk, cotangents, batch_size).total <= free

    if fits(k):
        return None
    if not fits(1):
        need = factor * step_memory(encoder, runs, 1, cotangents, batch_size).total
        warnings.warn(
            f"--class-chunk auto: even one class per chunk is predicted to need {need / 2**30:.2f} GiB for {runs} "
            f"run(s), more than the {free / 2**30:.2f} GiB free on {encoder.device}; trying chunks of 1 class. "
            "Fewer runs per group (max_group) or a smaller model need less.",
            stacklevel=2,
        )
        return 1
    low, high = 1, k  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def resolve_class_chunk(class_chunk, encoder, runs: int, cotangents: int, batch_size: int) -> int | None:
    """The engine's class chunk: "auto" resolved for this group, a number kept, None for all classes at once."""
    class_chunk = parse_class_chunk(class_chunk)
    if class_chunk == "auto":
        return auto_class_chunk(encoder, runs, cotangents, batch_size)
    return class_chunk


def safety(device: torch.device | str) -> float:
    """The safety factor of `device`'s type (SAFETY; the CPU's for other types)."""
    return SAFETY.get(torch.device(device).type, SAFETY["cpu"])


def free_memory(device: torch.device | str) -> int:
    """Bytes a step may allocate on `device`: CUDA's free memory plus PyTorch's cached, unused blocks; on the CPU
    the available RAM (`available_ram`).

    Raises:
        FastPromptError: another device type (pass a number to --class-chunk there).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return available_ram()
    raise FastPromptError(f"--class-chunk auto reads the free memory of CPU and CUDA devices, not '{device.type}'; "
                          "pass a number of classes.")  # fmt: skip


def available_ram() -> int:
    """Available RAM in bytes: MemAvailable of /proc/meminfo (psutil, or the free pages of os.sysconf, where that is
    missing), lowered to the control group's limit minus its usage when one is set.

    Raises:
        FastPromptError: no way to read it on this system (pass a number to --class-chunk).
    """
    available = _meminfo_available()
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            try:
                available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, ValueError, OSError):
                raise FastPromptError(
                    "--class-chunk auto cannot read the available memory here; pass a number of classes."
                ) from None
    limit = _cgroup_headroom()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory control group (v2, then v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # "no limit" (v1 writes a huge number)
            return None
        return max(0, int(limit_text) - usage)
    return None


def _rows_per_run(encoder, chunk: int) -> tuple[int, int]:
    """(token rows of one run in the largest chunk of `chunk` consecutive classes, attention keys per row)."""
    k = encoder.num_classes
    eot = encoder.layout.eot_index.tolist()
    starts = range(0, k, chunk)
    if encoder.path == "shared_prefix":
        lp = encoder.prefix_length
        lengths = [int(index) - lp + 1 for index in eot]
        suffix_tokens = 0
        for start in starts:
            part = lengths[start : start + chunk]
            buckets = plan_buckets(part, encoder.bucket_overhead_tokens)
            suffix_tokens = max(suffix_tokens, sum(len(b) * max(part[i] for i in b) for b in buckets))
        return lp + suffix_tokens, lp + max(lengths)
    if encoder.path == "truncated":
        longest = max(max(eot[s : s + chunk]) + 1 for s in starts)
        return min(chunk, k) * longest, longest
    length = encoder.tower.context_length
    return min(chunk, k) * length, length


def _embed_dim(tower, width: int) -> int:
    projection = tower.text_projection
    if projection is None:
        return width
    if isinstance(projection, torch.nn.Linear):
        return projection.out_features
    return int(projection.shape[-1]) if isinstance(projection, torch.Tensor) else width


__all__ = [
    "SAFETY",
    "StepMemory",
    "auto_class_chunk",
    "available_ram",
    "free_memory",
    "parse_class_chunk",
    "resolve_class_chunk",
    "safety",
    "step_memory",
]


M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the system (CPU sweeps).

    A lock-step group's per-layer activations above glibc's largest mmap threshold (32 MiB: e.g. P = 45 runs of
    OxfordPets on RN50) are otherwise mapped and unmapped at every step, and every step pays their page faults again
    (bench/results/README.md, "train_step.csv"). With mmap off and no trimming, freed blocks are reused. The process
    then keeps its peak memory until it exits. The trim threshold is set to -1, which glibc reads as the largest
    size_t (mallopt's value is an int; its setter takes a size_t), i.e. never trim.

    Returns:
        Whether the settings took effect (False off glibc, e.g. macOS or musl).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False
