"""Forward + backward time of PromptEncoder's three exact paths on the RN50 text tower (CPU, wall-clock medians).

For OxfordPets (37 classes), StanfordCars (196) and ImageNet (1000) with ProGrad's initialisation prompt (OxfordPets:
"a type of pet, a photo of a", the others "a photo of a") and P = 1 and 4 contexts, each path computes the text
features of all classes and the gradient of their sum with respect to the context (autograd, frozen weights). The
paths of one configuration run interleaved (round-robin) so that they share the machine's load equally.

The work is counted in tokens through the 12 layers: reference 77*K*P, truncated L_trunc*K*P, shared prefix
(Lp + sum over buckets of padded suffix length x classes) * P. The predicted speed-up of a path is the reference's
tokens over its own; the table shows it beside the measured one.

Big cases are expensive on a CPU (the reference on ImageNet at P = 4 is 4000 sequences of 77 tokens). The time of each
call is predicted from the tokens and the seconds per token measured on OxfordPets at P = 1 (always run first); calls
predicted over --max-call-s are skipped (a note says so) and the repeats of a call are cut to fit --budget-s. Classes
are processed in chunks of at most --chunk-tokens tokens (forward and backward per chunk, gradients summed: the same
work, bounded memory); the shared-prefix path recomputes its prefix once per chunk.

Usage:
    python bench/bench_encoder.py                      # about 10 minutes on 2 CPU cores
    python bench/bench_encoder.py --max-call-s 400     # also the reference on ImageNet at P = 1
    python bench/bench_encoder.py --datasets OxfordPets --repeats 5 --out /tmp/encoder.csv
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, interleaved, load_classnames, median

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder

PREFIXES = {"OxfordPets": "a type of pet, a photo of a"}  # ProGrad's initialisation; "a photo of a" elsewhere
DATASETS = ("OxfordPets", "StanfordCars", "ImageNet")
PATHS = ("reference", "truncated", "shared_prefix")
FIELDS = [
    "dataset", "K", "P", "path", "tokens", "median_s", "repeats", "speedup_vs_reference", "predicted_speedup",
    "measured_over_predicted", "chunks", "times_s", "note",
]  # fmt: skip
CALIBRATION = "OxfordPets"


def path_tokens(encoder: PromptEncoder, path: str, p: int) -> int:
    """Token positions that `path` pushes through every layer for all K classes and P contexts."""
    k = encoder.num_classes
    if path == "reference":
        return encoder.tower.context_length * k * p
    if path == "truncated":
        return encoder.truncated_length * k * p
    buckets = encoder._plan(tuple(range(k)))
    return (encoder.prefix_length + sum(b.length * b.classes.numel() for b in buckets)) * p


def chunk_classes(encoder: PromptEncoder, path: str, p: int, chunk_tokens: int) -> list[torch.Tensor | None]:
    """Class chunks whose tokens stay under `chunk_tokens` ([None]: all classes at once)."""
    k = encoder.num_classes
    per_class = path_tokens(encoder, path, p) / k
    size = max(1, int(chunk_tokens // per_class))
    if size >= k:
        return [None]
    return [torch.arange(start, min(start + size, k)) for start in range(0, k, size)]


def forward_backward(encoder: PromptEncoder, path: str, ctx: torch.Tensor, chunks: list) -> torch.Tensor:
    """Features of all classes and d(sum of features)/d(ctx), chunk by chunk; returns the gradient."""
    function = getattr(encoder, path)
    grad = torch.zeros_like(ctx)
    for chunk in chunks:
        leaf = ctx.detach().requires_grad_(True)
        out = function(leaf, chunk)
        grad += torch.autograd.grad(out.sum(), leaf)[0]
    return grad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and configuration (default 3)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="class lists to time")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1, 4], help="values of P (default 1 4)")
    parser.add_argument("--max-call-s", type=float, default=90.0, help="skip calls predicted longer (default 90)")
    parser.add_argument("--budget-s", type=float, default=45.0, help="cut repeats to fit this per path and config")
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per class chunk (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_paths.csv", help="CSV to append rows to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = load_clip("RN50", quick_gelu=True)  # random weights; the paper's network (12 x 512 text tower, QuickGELU)
    datasets = [CALIBRATION] + [name for name in args.datasets if name != CALIBRATION]
    seconds_per_token: dict[str, float] = {}
    rows = []
    start = time.perf_counter()
    for dataset in datasets:
        names = load_classnames(args.prompts, dataset)
        encoder = PromptEncoder(clip, names, n_ctx=16, prompt_prefix=PREFIXES.get(dataset, "a photo of a"))
        for p in sorted(args.contexts):
            ctx = encoder.initial_context("template").expand(p, -1, -1).clone()
            tokens = {path: path_tokens(encoder, path, p) for path in PATHS}
            chunks = {path: chunk_classes(encoder, path, p, args.chunk_tokens) for path in PATHS}
            calibrating = not seconds_per_token
            repeats, warmup, notes = {}, {}, {}
            for path in PATHS:
                predicted = None if calibrating else tokens[path] * seconds_per_token[path]
                if predicted is not None and predicted > args.max_call_s:
                    repeats[path] = 0
                    notes[path] = f"skipped: predicted {predicted:.0f} s per call > --max-call-s {args.max_call_s:g}"
                    continue
                fits = args.repeats if predicted is None else int(args.budget_s // max(predicted, 1e-9))
                repeats[path] = max(1, min(args.repeats, fits))
                warmup[path] = 1 if predicted is None or predicted < 10 else 0
                notes[path] = (
                    "" if repeats[path] == args.repeats else f"repeats cut to fit --budget-s {args.budget_s:g}"
                )
            fns = {path: functools.partial(forward_backward, encoder, path, ctx, chunks[path]) for path in PATHS}
            times = interleaved(fns, repeats, warmup)
            if calibrating:
                seconds_per_token.update({path: median(times[path]) / tokens[path] for path in PATHS})
            reference_s = median(times["reference"]) if times["reference"] else None
            for path in PATHS:
                measured = median(times[path]) if times[path] else None
                predicted_speedup = tokens["reference"] / tokens[path]
                speedup = reference_s / measured if reference_s and measured else None
                rows.append(
                    {
                        "dataset": dataset,
                        "K": encoder.num_classes,
                        "P": p,
                        "path": path,
                        "tokens": tokens[path],
                        "median_s": f"{measured:.4g}" if measured else "",
                        "repeats": len(times[path]),
                        "speedup_vs_reference": f"{speedup:.2f}" if speedup else "",
                        "predicted_speedup": f"{predicted_speedup:.2f}",
                        "measured_over_predicted": f"{speedup / predicted_speedup:.2f}" if speedup else "",
                        "chunks": len(chunks[path]),
                        "times_s": " ".join(f"{t:.3g}" for t in times[path]),
                        "note": notes[path],
                    }
                )
            done = rows[-len(PATHS) :]
            print(f"{dataset} K={encoder.num_classes} P={p}: " + ", ".join(
                f"{r['path']} {r['median_s'] or 'skipped'}" for r in done
            ) + f"  ({time.perf_counter() - start:.0f} s so far)", flush=True)  # fmt: skip
    columns = ["dataset", "K", "P", "path", "tokens", "median_s", "repeats", "speedup_vs_reference",
               "predicted_speedup", "measured_over_predicted", "note"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s.")
    if math.isfinite(seconds_per_token.get("reference", math.nan)):
        print(f"Reference path on OxfordPets P=1: {1e3 * seconds_per_token['reference']:.2f} ms per token.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
