"""Microbenchmark of the fused ProGrad update (kernels/prograd_update.py) against its PyTorch baselines.

(a) fused: the two Triton launches; (b) ref: the vectorised PyTorch reference; (c) loop: the paper's way, a Python
loop over runs and tensors with separate operations and a Python ``if`` on the conflict test; (d) cpu_fast: the CPU
path that ``prograd_update`` takes on CPU tensors without Triton (families of equal segments as strided views, or
per-segment dots and in-place passes).

On a GPU: ``triton.testing.do_bench`` medians (with 20 % and 80 % quantiles) over segments 1..1024 and segment lengths
8192 (16 x 512, one context) .. 1M, skipping what does not fit in memory; achieved GB/s counts the bytes the update
must move (read g_d, g_g, param, momentum; write param, momentum) and is compared with a measured device copy of the
same number of bytes. Rows are appended to bench/results/prograd_update.csv.

Without a GPU: says so, runs the fused kernels on the Triton interpreter against the reference on a small case, checks
(d) against (b) on every case, then times (b), (c) and (d) on the CPU, interleaved round-robin so that they share the
machine's load (wall-clock medians and 20 % / 80 % quantiles, about a minute per thread count), at each thread count
of --threads, into bench/results/prograd_update_cpu.csv (the device column names the thread count), exits 0. The CPU
cases: S x L equal segments (as before), runs of three tensors of very different lengths (8192 + 65536 + 32 per run:
a 16 x 512 context, a larger tensor, a bias) for 4 and 32 runs, 64 segments of random lengths (no period), and
CoCoOp's five tensors per run on RN50 (2048 + 65536 + 64 + 32768 + 512: context, meta-net weights and biases) for 4
and 32 runs (on a GPU also 256 and 1024 runs).

Usage:
    python bench/bench_prograd_update.py                # full sweep on a GPU, the CPU path otherwise
    python bench/bench_prograd_update.py --quick        # a smaller sweep (CPU: two small cases)
    python bench/bench_prograd_update.py --quick --out update.csv    # rows to another CSV
    python bench/bench_prograd_update.py --threads 1    # CPU: one thread count only (default 1,2)
    python bench/plot_prograd_update.py                 # PNG plots of the CSVs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import interleaved, time_once

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined, so they run on the CPU

from fastprompt.kernels.prograd_update import (  # noqa: E402  (after TRITON_INTERPRET is set)
    prograd_update,
    prograd_update_cpu,
    prograd_update_loop,
    prograd_update_ref,
    use_triton,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date", "device", "torch", "triton", "commit", "mode", "impl", "grad_dtype", "segments", "segment_length",
    "elements", "bytes", "median_ms", "q20_ms", "q80_ms", "gbps", "copy_gbps", "fraction_of_copy",
]  # fmt: skip
IMPLS = {"fused": prograd_update, "ref": prograd_update_ref, "loop": prograd_update_loop}
CPU_IMPLS = {"ref": prograd_update_ref, "loop": prograd_update_loop, "cpu_fast": prograd_update_cpu}
CPU_UNIFORM = [(1, 8192), (16, 8192), (128, 8192), (1, 1 << 17), (16, 1 << 17)]
RUN_TENSORS = [8192, 65536, 32]  # per run: a 16 x 512 context, a larger tensor, a bias
RANDOM_LENGTHS = (64, 16384)  # segments, longest length: random lengths from 1, no period
# Per CoCoOp run on RN50 (W 512, D 1024, n_ctx 4; fastprompt/train/cocoop.py): ctx 4 x 512, meta-net linear1 weight
# 64 x 1024 and bias 64, linear2 weight 512 x 64 and bias 512: five segments of very different lengths.
COCOOP_TENSORS = [4 * 512, 64 * 1024, 64, 512 * 64, 512]
COCOOP_RUNS = (4, 32)  # CPU cases; the GPU sweep adds 256 and 1024 runs


def cpu_cases() -> list[tuple[str, list[int]]]:
    """(segment_length label, segment lengths) of every CPU case."""
    cases = [(str(length), [length] * segments) for segments, length in CPU_UNIFORM]
    cases += [("+".join(map(str, RUN_TENSORS)), RUN_TENSORS * runs) for runs in (4, 32)]
    count, longest = RANDOM_LENGTHS
    lengths = torch.randint(1, longest + 1, (count,), generator=torch.Generator().manual_seed(64)).tolist()
    cases.append((f"random 1..{longest}", lengths))
    cases += [(cocoop_label(), COCOOP_TENSORS * runs) for runs in COCOOP_RUNS]  # after the others: --quick unchanged
    return cases


def cocoop_label() -> str:
    return "cocoop " + "+".join(map(str, COCOOP_TENSORS))


def git_commit() -> str:
    """HEAD's hash, with '+dirty' if this benchmark or the kernel differ from it; 'uncommitted' without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "kernels/prograd_update.py", "bench/bench_prograd_update.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=name,
        torch=torch.__version__,
        triton=triton_version,
        commit=git_commit(),
    )


def make_inputs(segments: int, length: int, device: torch.device, grad_dtype=torch.float32, seed: int = 0) -> dict:
    """Arguments of prograd_update for `segments` segments of `length` (see make_inputs_for_lengths)."""
    return make_inputs_for_lengths([length] * segments, device, grad_dtype, seed)


def make_inputs_for_lengths(lengths: list[int], device: torch.device, grad_dtype=torch.float32, seed: int = 0) -> dict:
    """Arguments of prograd_update: even segments conflict, odd ones agree; momentum initialised (the steady state)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    segments, num_elements = len(lengths), sum(lengths)
    length_tensor = torch.tensor(lengths, dtype=torch.int64, device=device)
    g_d = torch.randn(num_elements, device=device, generator=gen)
    sign = torch.where(torch.arange(segments, device=device) % 2 == 0, -1.0, 1.0)
    sign = sign.repeat_interleave(length_tensor, output_size=num_elements)
    g_g = sign * 0.5 * g_d + torch.randn(num_elements, device=device, generator=gen)
    scalars = dict(dtype=torch.float32, device=device)
    return dict(
        param=torch.randn(num_elements, device=device, generator=gen),
        momentum_buf=torch.randn(num_elements, device=device, generator=gen),
        g_d=g_d.to(grad_dtype),
        g_g=g_g.to(grad_dtype),
        offsets=torch.cat([length_tensor.new_zeros(1), length_tensor.cumsum(0)]),
        lam=torch.full((segments,), 1.0, **scalars),
        lr=torch.full((segments,), 1e-3, **scalars),
        momentum=torch.full((segments,), 0.9, **scalars),
        weight_decay=torch.full((segments,), 5e-4, **scalars),
        first_step=torch.zeros(segments, dtype=torch.bool, device=device),
    )


def bytes_moved(num_elements: int, grad_dtype: torch.dtype) -> int:
    """The update's compulsory traffic: read g_d, g_g, param, momentum; write param, momentum."""
    grad_size = torch.empty((), dtype=grad_dtype).element_size()
    return num_elements * (2 * grad_size + 4 * 4)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


def interpreter_check(device: torch.device = CPU) -> None:
    """The fused kernels (on the Triton interpreter on the CPU) against the reference, on a small multi-segment case:
    benchmarks only count when the results agree."""
    if not use_triton(device):
        print("interpreter check skipped: triton is not installed")
        return
    case = make_inputs(5, 1500, device, seed=1)
    case["first_step"][::2] = True
    fused = {k: v.clone() for k, v in case.items()}
    ref = {k: v.clone() for k, v in case.items()}
    fused_stats = prograd_update(**fused)
    ref_stats = prograd_update_ref(**ref)
    errors = {
        "param": relative_error(fused["param"], ref["param"]),
        "momentum_buf": relative_error(fused["momentum_buf"], ref["momentum_buf"]),
        "dot": relative_error(fused_stats.dot, ref_stats.dot),
        "cos": relative_error(fused_stats.cos, ref_stats.cos),
    }
    same_flags = torch.equal(fused_stats.conflict, ref_stats.conflict)
    ok = same_flags and all(err <= 1e-5 for err in errors.values())  # the suite's fp32 floor (tests/numerics.py)
    summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    print(f"{device.type} check (5 segments x 1500, fp32): {'OK' if ok else 'FAILED'}; relative errors {summary}")
    if not ok:
        raise SystemExit("the fused kernels disagree with the reference: benchmarks only count when the tests pass")


def wall_clock_ms(fn, min_runs: int = 3, min_seconds: float = 0.2) -> tuple[float, float, float]:
    """Median, 20 % and 80 % quantiles of repeated wall-clock runs (after one warm-up), in ms."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 50:
            break
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), deciles[1], deciles[7]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    print(f"appended {len(rows)} rows to {shown}")


def row(env, mode, impl, grad_dtype, segments, length, timing, copy_gbps, num_elements=None) -> dict:
    """One CSV row; `length` is the segment length, or a label for a case of unequal segments (then give
    num_elements)."""
    num_elements = segments * length if num_elements is None else num_elements
    moved = bytes_moved(num_elements, grad_dtype)
    gbps = moved / (timing[0] * 1e-3) / 1e9
    return dict(
        **env, mode=mode, impl=impl, grad_dtype=str(grad_dtype).removeprefix("torch."), segments=segments,
        segment_length=length, elements=num_elements, bytes=moved, median_ms=f"{timing[0]:.5g}",
        q20_ms=f"{timing[1]:.5g}", q80_ms=f"{timing[2]:.5g}", gbps=f"{gbps:.4g}", copy_gbps=f"{copy_gbps:.4g}",
        fraction_of_copy=f"{gbps / copy_gbps:.3g}",
    )  # fmt: skip


def run_gpu(quick: bool, out: Path) -> None:
    device = torch.device("cuda")
    interpreter_check(device)
    env = environment(device)
    segment_counts = [1, 16, 256, 1024] if quick else [1, 4, 16, 64, 256, 1024]
    lengths = [8192, 1 << 20] if quick else [8192, 1 << 15, 1 << 17, 1 << 20]
    for grad_dtype in (torch.float32, torch.bfloat16):
        for segments in segment_counts:
            for length in lengths:
                gpu_case(env, device, grad_dtype, str(length), [length] * segments, out)
        for runs in (*COCOOP_RUNS, 256, 1024):
            gpu_case(env, device, grad_dtype, cocoop_label(), COCOOP_TENSORS * runs, out)


def gpu_case(env: dict, device: torch.device, grad_dtype, label: str, lengths: list[int], out: Path) -> None:
    """Time every implementation on one case of segment `lengths` (`label` names them) and append its rows."""
    import triton.testing

    segments, num_elements = len(lengths), sum(lengths)
    # Inputs, the reference's fp64 temporaries and segment ids: about 80 bytes per element at most.
    if num_elements * 80 > 0.6 * torch.cuda.mem_get_info(device)[0]:
        print(f"skip {segments} x {label}: beyond memory")
        return
    moved = bytes_moved(num_elements, grad_dtype)
    source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda s=source, t=target: t.copy_(s), quantiles=[0.5])
    copy_gbps = moved / (copy_ms * 1e-3) / 1e9
    source = target = None  # free before the inputs are built
    case = make_inputs_for_lengths(lengths, device, grad_dtype)
    rows = []
    for impl, fn in IMPLS.items():
        timing = triton.testing.do_bench(lambda fn=fn, c=case: fn(**c), quantiles=[0.5, 0.2, 0.8])
        rows.append(row(env, "gpu", impl, grad_dtype, segments, label, timing, copy_gbps, num_elements))
        print(
            f"{impl:5s} {str(grad_dtype):15s} S={segments:5d} L={label:>8s}: {timing[0]:9.4f} ms "
            f"{rows[-1]['gbps']:>8s} GB/s ({rows[-1]['fraction_of_copy']} of copy)"
        )
    write_rows(out, rows)  # case by case: a sweep stopped by a time limit keeps what it measured
    case = None
    torch.cuda.empty_cache()


def cpu_check(case: dict) -> None:
    """cpu_fast against the reference on a copy of `case`: benchmarks only count when the results agree."""
    fast = {k: v.clone() for k, v in case.items()}
    ref = {k: v.clone() for k, v in case.items()}
    fast_stats, ref_stats = prograd_update_cpu(**fast), prograd_update_ref(**ref)
    errors = [relative_error(fast[name], ref[name]) for name in ("param", "momentum_buf")]
    errors += [relative_error(getattr(fast_stats, name), getattr(ref_stats, name)) for name in ("dot", "gd_sq", "cos")]
    if max(errors) > 1e-5 or not torch.equal(fast_stats.conflict, ref_stats.conflict):  # tests/numerics.py fp32 floor
        raise SystemExit(f"cpu_fast disagrees with the reference (relative errors {errors}): not timed")


def run_cpu(threads: list[int], seconds_per_case: float, quick: bool, out: Path) -> None:
    print("no CUDA device: no GPU timings. Running the interpreter correctness check and timing the CPU paths.")
    interpreter_check()
    device = torch.device("cpu")
    rows = []
    for thread_count in threads:
        # On a small shared machine, intra-op threads wait on each other at every parallel op: read the 1-thread rows
        # first (bench/results/README.md).
        torch.set_num_threads(thread_count)
        env = environment(device)
        print(f"{env['device']}:")
        for label, lengths in cpu_cases()[:: 5 if quick else 1]:  # quick: 1 x 8192 and 4 runs x 3 tensors
            segments, num_elements = len(lengths), sum(lengths)
            case = make_inputs_for_lengths(lengths, device)
            cpu_check(case)
            moved = bytes_moved(num_elements, torch.float32)
            source = torch.empty(moved // 2, dtype=torch.uint8)
            target = torch.empty_like(source)
            copy_ms = wall_clock_ms(lambda s=source, t=target: t.copy_(s))[0]
            copy_gbps = moved / (copy_ms * 1e-3) / 1e9
            source = target = None
            fns = {impl: (lambda fn=fn, c=case: fn(**c)) for impl, fn in CPU_IMPLS.items()}
            one_round = sum(time_once(fn) for fn in fns.values())
            repeats = max(3 if quick else 7, min(41, int(seconds_per_case / one_round)))
            times = interleaved(fns, repeats, warmup=1)
            medians = {}
            for impl, samples in times.items():
                samples_ms = [t * 1e3 for t in samples]
                deciles = statistics.quantiles(samples_ms, n=10)
                timing = (statistics.median(samples_ms), deciles[1], deciles[7])
                medians[impl] = timing[0]
                rows.append(row(env, "cpu", impl, torch.float32, segments, label, timing, copy_gbps, num_elements))
            print(
                f"  S={segments:4d} L={label:>18s}: "
                + "  ".join(f"{impl} {ms:8.3f} ms" for impl, ms in medians.items())
                + f"  cpu_fast/loop {medians['cpu_fast'] / medians['loop']:.2f} ({repeats} rounds)"
            )
    write_rows(out, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (GPU: 16 cases; CPU: 2 cases)")
    parser.add_argument("--threads", default="1,2", help="CPU: torch thread counts to time, comma-separated (1,2)")
    parser.add_argument("--seconds-per-case", type=float, default=4.0, help="CPU: time budget of one case (4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to append rows to (default bench/results/prograd_update.csv on a GPU, "
                        "prograd_update_cpu.csv otherwise)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if HAS_CUDA:
        run_gpu(args.quick, args.out or RESULTS / "prograd_update.csv")
    else:
        threads = [int(n) for n in args.threads.split(",")]
        run_cpu(threads, args.seconds_per_case, args.quick, args.out or RESULTS / "prograd_update_cpu.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
