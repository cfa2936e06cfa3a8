"""Peak memory of an ImageNet-size training step against the memory model of `--class-chunk` (train/memory.py).

The setting: P ProGrad runs (two cotangents) of the 1000 ImageNet class names (open_clip's list), ProGrad's ImageNet
prompt "a photo of a {}." with 16 context vectors, batch 32, on the RN50 text tower with random weights and QuickGELU
(the image tower is dropped: the step never uses it). Each configuration (P, chunk, precision) runs in a fresh
subprocess, so that one configuration's peak cannot hide another's:

- on the CPU, the step's peak is the process's peak RSS (`resource.getrusage(...).ru_maxrss`) minus the RSS just
  before the first step;
- on CUDA, `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` before the first step.

Against it stands the model's prediction `step_memory(...).total` for the chunk the step used (without the safety
factor) and, for `auto`, the figure that `auto` fitted the chunk to (the free memory, or a given budget).

Chunk specifications: `none` (all classes at once), a number of classes, `auto` (the device's free memory) or
`auto=MIB` (auto for a budget of MIB mebibytes: the measured peak must stay within it). `--predict-contexts` adds
rows of the model's prediction alone (no measurement) for run counts too large to measure here.

Usage:
    python bench/bench_memory.py                                   # CPU: P = 1 and 4, a few minutes on 2 cores
    python bench/bench_memory.py --device cuda --contexts 15 45 --chunks none 100 auto auto=4096 --steps 2
    python bench/bench_memory.py --model fastprompt-tiny --classes 20 --contexts 2 --chunks 5 --out /tmp/m.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, load_classnames

MIB = 2**20
FIELDS = [
    "model", "classes", "P", "precision", "chunk_arg", "chunk", "rows_per_run", "steps", "s_per_step",
    "baseline_mib", "peak_mib", "step_peak_mib", "predicted_mib", "predicted_with_safety_mib",
    "measured_over_predicted", "budget_mib", "within_budget", "status", "note",
]  # fmt: skip
PREFIX = "a photo of a"  # ProGrad's ImageNet template, "a photo of a {}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", default="RN50", help="open_clip model, random weights (default RN50)")
    parser.add_argument("--classes", type=int, default=1000, help="the first N ImageNet class names (default 1000)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1, 4], help="run counts P (default 1 4)")
    parser.add_argument(
        "--chunks", nargs="+", default=["none", "250", "auto"], help="none, N, auto or auto=MIB (default none 250 auto)"
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                        help="text tower precision; bf16/fp16 are CUDA autocast (default fp32)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1, help="engine steps per configuration (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="images per run and step (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch threads (default 2)")
    parser.add_argument("--predict-contexts", nargs="*", type=int, default=[],
                        help="run counts to add the model's prediction for, without measuring")  # fmt: skip
    parser.add_argument("--worker-timeout", type=float, default=900, help="seconds per configuration (default 900)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.csv", help="CSV to append rows to")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    args = parser.parse_args(argv)
    for spec in args.chunks:
        chunk_spec(spec)  # fails here, not in a worker
    if min(args.contexts) < 1 or args.steps < 1 or args.classes < 1:
        parser.error("--contexts, --steps and --classes must be at least 1")
    return args


def chunk_spec(spec: str) -> tuple[str, int | None]:
    """("none" | "fixed" | "auto", number or budget in MiB) of a --chunks entry."""
    if spec == "none":
        return "none", None
    if spec == "auto":
        return "auto", None
    if spec.startswith("auto=") and spec[5:].isdigit():
        return "auto", int(spec[5:])
    if spec.isdigit() and int(spec) >= 1:
        return "fixed", int(spec)
    raise SystemExit(f"--chunks: '{spec}' is not none, a positive number, auto or auto=MIB")


def build(args, device: torch.device, runs: int, precision: str):
    """(clip, encoder, engine factory) of the setting, on `device`."""
    from fastprompt.clip import load_clip
    from fastprompt.encoder import PromptEncoder
    from fastprompt.train.config import RunConfig, Schedule, resolve
    from fastprompt.train.engine import LockstepEngine, RunState
    from fastprompt.train.sweep import AUTOCAST

    torch.manual_seed(0)
    clip = load_clip(args.model, device=device, quick_gelu=True)  # random weights; the network OpenAI trained
    clip.model.visual = None  # the step never runs the image tower
    classnames = load_classnames(args.prompts, "ImageNet")[: args.classes]
    k = len(classnames)
    encoder = PromptEncoder(clip, classnames, n_ctx=16, prompt_prefix=PREFIX)
    generator = torch.Generator().manual_seed(1)
    embed_dim = encoder.tower.project(torch.zeros(1, encoder.width, device=device)).shape[-1]
    features = torch.randn(2 * args.batch, 1, embed_dim, generator=generator)
    labels = torch.randint(k, (2 * args.batch,), generator=generator)
    teacher = torch.nn.functional.normalize(torch.randn(k, embed_dim, generator=generator), dim=-1)

    def engine(class_chunk):
        states = []
        for seed in range(1, runs + 1):
            config = resolve(RunConfig(method="prograd", dataset="ImageNet", shots=16, seed=seed))
            schedule = Schedule(len(labels), args.batch, config.epochs, config.lr, config.warmup_lr)
            states.append(RunState(config, torch.arange(len(labels)), labels, schedule,
                                   torch.Generator().manual_seed(seed), teacher="zs"))  # fmt: skip
        contexts = encoder.initial_context("template").expand(runs, -1, -1).clone()
        return LockstepEngine(encoder, features, states, contexts, {"zs": teacher}, clip.logit_scale,
                              class_chunk=class_chunk, autocast_dtype=AUTOCAST[precision])  # fmt: skip

    return encoder, engine


def current_rss() -> int:
    """This process's resident memory now, in bytes (from /proc/self/statm; the peak so far where that is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(args) -> dict:
    """One configuration in this (fresh) process: JSON-ready measurements."""
    from fastprompt.train.memory import auto_class_chunk, free_memory, safety, step_memory

    runs, spec, precision = json.loads(args.worker)
    kind, value = chunk_spec(spec)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    encoder, make_engine = build(args, device, runs, precision)
    k = encoder.num_classes
    budget = None
    if kind == "auto":
        budget = value * MIB if value is not None else free_memory(device)
        chunk_arg = auto_class_chunk(encoder, runs, cotangents=2, batch_size=args.batch, free_bytes=budget)
    else:
        chunk_arg = value
    engine = make_engine(chunk_arg)
    chunk = engine.class_chunk or k
    model = step_memory(encoder, runs, chunk, cotangents=2, batch_size=args.batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        setup_peak, baseline = peak_rss(), current_rss()
    started = time.perf_counter()
    status, note = "ok", ""
    try:
        for _ in range(args.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize(device)
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if "out of memory" not in str(error) and "allocate" not in str(error):
            raise
        status, note = "out of memory", str(error).splitlines()[0][:200]
    seconds = (time.perf_counter() - started) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss()
        if peak <= setup_peak:
            note = "the step stayed below the setup's peak RSS: step_peak is an upper bound"
    step_peak = peak - baseline
    return {
        "chunk": chunk if chunk < k else "none",
        "rows_per_run": model.rows_per_run,
        "s_per_step": round(seconds, 3),
        "baseline_mib": round(baseline / MIB, 1),
        "peak_mib": round(peak / MIB, 1),
        "step_peak_mib": round(step_peak / MIB, 1),
        "predicted_mib": round(model.total / MIB, 1),
        "predicted_with_safety_mib": round(safety(device) * model.total / MIB, 1),
        "measured_over_predicted": round(step_peak / model.total, 3),
        "budget_mib": round(budget / MIB, 1) if budget is not None else "",
        "within_budget": (step_peak <= budget) if budget is not None and status == "ok" else "",
        "status": status,
        "note": note,
    }


def run_configuration(args, runs: int, spec: str, precision: str) -> dict:
    """One configuration in a fresh subprocess; its row (a failed one says why)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([runs, spec, precision]),
            "--device", args.device, "--model", args.model, "--classes", str(args.classes), "--steps",
            str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads), "--prompts",
            str(args.prompts)]  # fmt: skip
    base = {"model": args.model, "classes": args.classes, "P": runs, "precision": precision, "chunk_arg": spec,
            "steps": args.steps}  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "note": f"over {args.worker_timeout:.0f} s"}
    if done.returncode != 0:
        killed = done.returncode < 0 and -done.returncode == 9
        reason = "killed (out of memory?)" if killed else f"exit {done.returncode}"
        tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return {**base, "status": "failed", "note": f"{reason}: {tail}"}
    return {**base, **json.loads(done.stdout.strip().splitlines()[-1])}


def predicted_rows(args, precision: str) -> list[dict]:
    """The model's prediction alone for --predict-contexts (each chunk spec except auto)."""
    from fastprompt.train.memory import safety, step_memory

    encoder, _ = build(args, torch.device("cpu"), 1, precision)
    rows = []
    for runs in args.predict_contexts:
        for spec in args.chunks:
            kind, value = chunk_spec(spec)
            if kind == "auto":
                continue
            model = step_memory(encoder, runs, value or encoder.num_classes, cotangents=2, batch_size=args.batch)
            rows.append({"model": args.model, "classes": args.classes, "P": runs, "precision": precision,
                         "chunk_arg": spec, "chunk": value or "none", "rows_per_run": model.rows_per_run,
                         "predicted_mib": round(model.total / MIB, 1),
                         "predicted_with_safety_mib": round(safety(args.device) * model.total / MIB, 1),
                         "status": "predicted", "note": "the model alone, not measured"})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for precision in args.precisions:
        for runs in args.contexts:
            for spec in args.chunks:
                print(f"P={runs} chunk={spec} {precision} ...", flush=True)
                rows.append(run_configuration(args, runs, spec, precision))
                append_rows(args.out, rows[-1:], FIELDS)  # row by row: a run stopped by a time limit keeps its rows
                row = rows[-1]
                print(f"  {row.get('status')}: step peak {row.get('step_peak_mib', '-')} MiB, predicted "
                      f"{row.get('predicted_mib', '-')} MiB, chunk {row.get('chunk', '-')}", flush=True)  # fmt: skip
        if args.predict_contexts:
            predicted = predicted_rows(args, precision)
            append_rows(args.out, predicted, FIELDS)
            rows += predicted
    columns = ["P", "precision", "chunk_arg", "chunk", "s_per_step", "step_peak_mib", "predicted_mib",
               "measured_over_predicted", "budget_mib", "within_budget", "status"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - started:.0f} s.")
    # A fixed chunk that runs out of memory is a measurement; auto running out of memory, or a crash, is a failure.
    failed = [r for r in rows if r.get("status") not in ("ok", "predicted", "out of memory") or
              (r.get("status") == "out of memory" and r["chunk_arg"].startswith("auto"))]  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
