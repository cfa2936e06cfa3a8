"""Microbenchmark of the fused ProGrad update (kernels/prograd_update.py) against its two PyTorch baselines.

(a) fused: the two Triton launches; (b) ref: the vectorised PyTorch reference; (c) loop: the paper's way, a Python
loop over runs and tensors with separate operations and a Python ``if`` on the conflict test.

On a GPU: ``triton.testing.do_bench`` medians (with 20 % and 80 % quantiles) over segments 1..1024 and segment lengths
8192 (16 x 512, one context) .. 1M, skipping what does not fit in memory; achieved GB/s counts the bytes the update
must move (read g_d, g_g, param, momentum; write param, momentum) and is compared with a measured device copy of the
same number of bytes. Rows are appended to bench/results/prograd_update.csv.

Without a GPU: says so, runs the fused kernels on the Triton interpreter against the reference on a small case, times
(b) and (c) on the CPU (wall-clock medians, a few seconds in all) into bench/results/prograd_update_cpu.csv, exits 0.

Usage:
    python bench/bench_prograd_update.py            # full sweep on a GPU, the CPU path otherwise
    python bench/bench_prograd_update.py --quick    # a smaller sweep
    python bench/plot_prograd_update.py             # PNG plots of the CSVs
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

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined, so they run on the CPU

from fastprompt.kernels.prograd_update import (  # noqa: E402  (after TRITON_INTERPRET is set)
    prograd_update,
    prograd_update_loop,
    prograd_update_ref,
    use_triton,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date", "device", "torch", "triton", "commit", "mode", "impl", "grad_dtype", "segments", "segment_length",
    "elements", "bytes", "median_ms", "q20_ms", "q80_ms", "gbps", "copy_gbps", "fraction_of_copy",
]  # fmt: skip
IMPLS = {"fused": prograd_update, "ref": prograd_update_ref, "loop": prograd_update_loop}


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
    """Arguments of prograd_update: half the segments conflict, momentum already initialised (the steady state)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    num_elements = segments * length
    g_d = torch.randn(num_elements, device=device, generator=gen)
    sign = torch.where(torch.arange(segments, device=device) % 2 == 0, -1.0, 1.0).repeat_interleave(length)
    g_g = sign * 0.5 * g_d + torch.randn(num_elements, device=device, generator=gen)
    scalars = dict(dtype=torch.float32, device=device)
    return dict(
        param=torch.randn(num_elements, device=device, generator=gen),
        momentum_buf=torch.randn(num_elements, device=device, generator=gen),
        g_d=g_d.to(grad_dtype),
        g_g=g_g.to(grad_dtype),
        offsets=torch.arange(segments + 1, dtype=torch.int64, device=device) * length,
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


def interpreter_check() -> None:
    """The fused kernels on the Triton interpreter against the reference, on a small multi-segment case."""
    if not use_triton(torch.device("cpu")):
        print("interpreter check skipped: triton is not installed")
        return
    case = make_inputs(5, 1500, torch.device("cpu"), seed=1)
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
    print(f"interpreter check (5 segments x 1500, fp32): {'OK' if ok else 'FAILED'}; relative errors {summary}")
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
    print(f"appended {len(rows)} rows to {path.relative_to(ROOT)}")


def row(env, mode, impl, grad_dtype, segments, length, timing, copy_gbps) -> dict:
    num_elements = segments * length
    moved = bytes_moved(num_elements, grad_dtype)
    gbps = moved / (timing[0] * 1e-3) / 1e9
    return dict(
        **env, mode=mode, impl=impl, grad_dtype=str(grad_dtype).removeprefix("torch."), segments=segments,
        segment_length=length, elements=num_elements, bytes=moved, median_ms=f"{timing[0]:.5g}",
        q20_ms=f"{timing[1]:.5g}", q80_ms=f"{timing[2]:.5g}", gbps=f"{gbps:.4g}", copy_gbps=f"{copy_gbps:.4g}",
        fraction_of_copy=f"{gbps / copy_gbps:.3g}",
    )  # fmt: skip


def run_gpu(quick: bool) -> None:
    import triton.testing

    device = torch.device("cuda")
    env = environment(device)
    segment_counts = [1, 16, 256, 1024] if quick else [1, 4, 16, 64, 256, 1024]
    lengths = [8192, 1 << 20] if quick else [8192, 1 << 15, 1 << 17, 1 << 20]
    rows = []
    for grad_dtype in (torch.float32, torch.bfloat16):
        for segments in segment_counts:
            for length in lengths:
                num_elements = segments * length
                # Inputs, the reference's fp64 temporaries and segment ids: about 80 bytes per element at most.
                if num_elements * 80 > 0.6 * torch.cuda.mem_get_info(device)[0]:
                    print(f"skip {segments} x {length}: beyond memory")
                    continue
                moved = bytes_moved(num_elements, grad_dtype)
                source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
                target = torch.empty_like(source)
                copy_ms = triton.testing.do_bench(lambda s=source, t=target: t.copy_(s), quantiles=[0.5])
                copy_gbps = moved / (copy_ms * 1e-3) / 1e9
                source = target = None  # free before the inputs are built
                case = make_inputs(segments, length, device, grad_dtype)
                for impl, fn in IMPLS.items():
                    timing = triton.testing.do_bench(lambda fn=fn, c=case: fn(**c), quantiles=[0.5, 0.2, 0.8])
                    rows.append(row(env, "gpu", impl, grad_dtype, segments, length, timing, copy_gbps))
                    print(
                        f"{impl:5s} {str(grad_dtype):15s} S={segments:5d} L={length:8d}: {timing[0]:9.4f} ms "
                        f"{rows[-1]['gbps']:>8s} GB/s ({rows[-1]['fraction_of_copy']} of copy)"
                    )
                case = None
                torch.cuda.empty_cache()
    write_rows(RESULTS / "prograd_update.csv", rows)


def run_cpu() -> None:
    print("no CUDA device: no GPU timings. Running the interpreter correctness check and timing the CPU baselines.")
    interpreter_check()
    # One thread: on a small shared machine, intra-op threads that wait on each other make the medians meaningless.
    torch.set_num_threads(1)
    device = torch.device("cpu")
    env = environment(device)
    rows = []
    for segments, length in [(1, 8192), (16, 8192), (128, 8192), (1, 1 << 17), (16, 1 << 17)]:
        case = make_inputs(segments, length, device)
        moved = bytes_moved(segments * length, torch.float32)
        source = torch.empty(moved // 2, dtype=torch.uint8)
        target = torch.empty_like(source)
        copy_ms = wall_clock_ms(lambda s=source, t=target: t.copy_(s))[0]
        copy_gbps = moved / (copy_ms * 1e-3) / 1e9
        for impl in ("ref", "loop"):
            timing = wall_clock_ms(lambda fn=IMPLS[impl], c=case: fn(**c))
            rows.append(row(env, "cpu", impl, torch.float32, segments, length, timing, copy_gbps))
            print(
                f"{impl:5s} S={segments:4d} L={length:7d}: {timing[0]:8.3f} ms  {rows[-1]['gbps']:>7s} GB/s "
                f"({rows[-1]['fraction_of_copy']} of copy)"
            )
    write_rows(RESULTS / "prograd_update_cpu.csv", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller GPU sweep")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if HAS_CUDA:
        run_gpu(args.quick)
    else:
        run_cpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())
