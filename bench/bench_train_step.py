"""One ProGrad training step on the CPU: fastprompt's lock-step engine against the reference's per-step work.

Both sides use the same RN50 CLIP (random weights; real 12 x 512 text tower, 1024-d embeddings), the 37 OxfordPets
classes, ProGrad's initialisation prompt "a type of pet, a photo of a" (16 context vectors) and a batch of 32.

- reference (issue): what the released ProGrad trainer does per step, as the issue counts it: the frozen RN50 image
  tower (eval mode, fp32, no grad) on 32 augmented 224 x 224 images for the student and again for the zero-shot
  teacher; the student's 77-token text tower over the 37 prompts with grad; the teacher's text tower over its 37
  prompts (no grad); two backward passes (G_d with retain_graph, then G_g); the per-tensor projection; torch.optim.SGD.
  Image decoding and augmentation are not timed (they favour the reference).
- reference (released): the same without the teacher's text forward, which the released code computes once at init.
- fastprompt P: `LockstepEngine.step()` for P ProGrad runs at once on cached, normalised image features (N = 592 =
  16 shots x 37, one view, D = 1024): one shared-prefix encoder forward for all P contexts, one batched VJP for G_d and
  G_g, the update (the PyTorch reference of the fused kernel, as the engine runs it on a CPU). Seconds per run-step =
  step time / P.

All variants run interleaved (round-robin); the table shows medians. Predicted FLOPs: RN50 image tower 4.1 GFLOPs per
224 x 224 image forward; text tower 2 x 12 layers x 12 x 512^2 = 75.5 MFLOPs per token forward; a backward pass with
frozen weights computes input gradients only (about one forward's FLOPs); attention scores are not counted.

On CUDA (`--device cuda`) every variant runs on the GPU and each timed call ends with a device synchronisation.
With another `--model` than RN50 the predicted FLOPs are left empty (the constants below are RN50's).

Usage:
    python bench/bench_train_step.py                 # about 5 minutes on 2 CPU cores
    python bench/bench_train_step.py --repeats 5 --contexts 1 4 15 --out train_step_extra.csv
    python bench/bench_train_step.py --device cuda --contexts 1 15 45 --repeats 20
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, interleaved, load_classnames, median

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.train.config import RunConfig, Schedule, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.zeroshot import zero_shot_weights

PREFIX = "a type of pet, a photo of a"
TEMPLATE = PREFIX + " {}."
N_CTX = 16
IMAGE_GFLOPS = 4.1  # RN50 image tower, one 224 x 224 forward
TOKEN_GFLOPS = 2 * 12 * 12 * 512**2 / 1e9  # text tower, one token forward
FIELDS = [
    "variant", "P", "K", "batch", "median_s", "repeats", "s_per_run_step", "speedup_vs_issue", "speedup_vs_released",
    "predicted_gflop_per_run_step", "predicted_speedup_vs_issue", "measured_over_predicted", "gflops_per_s",
    "times_s", "note",
]  # fmt: skip


class ReferenceStep:
    """The released ProGrad trainer's per-step work, written plainly on the open_clip model (as the tests' reference).

    Args:
        clip: the frozen CLIP (student and teacher share its weights; the work is the same as two copies).
        classnames: the K class names.
        teacher: (K, E) normalised zero-shot text features, used when the teacher's text is not recomputed per step.
        batch: images per step.
        teacher_text_per_step: run the teacher's 77-token text forward every step (the issue's count).
        lam: ProGrad's lambda.
        method: "prograd" (the default) or "coop": CoOp's released step (one image pass, one backward, random
            context, no teacher, no projection).
        prefix: the dataset's ProGrad template without " {}." (OxfordPets' by default).
    """

    def __init__(
        self,
        clip,
        classnames,
        teacher,
        batch: int,
        teacher_text_per_step: bool,
        lam: float = 1.0,
        method: str = "prograd",
        prefix: str = PREFIX,
    ) -> None:
        model = self.model = clip.model
        device = model.token_embedding.weight.device
        self.coop = method == "coop"  # CoOp's step: one image pass, one backward, no teacher, no projection
        head = "X " * N_CTX if self.coop else "X " * (N_CTX - len(prefix.split())) + prefix
        self.tokens = clip.tokenizer([f"{head.strip()} {name}." for name in classnames]).to(device)
        self.teacher_tokens = clip.tokenizer([f"{prefix} {name}." for name in classnames]).to(device)
        with torch.no_grad():
            self.embedded = model.token_embedding(self.tokens)
        start = self.embedded[0, 1 : 1 + N_CTX].clone()
        start[: N_CTX - len(prefix.split())] = 0.0
        if self.coop:
            start = torch.randn(N_CTX, start.shape[-1], generator=torch.Generator().manual_seed(0)).to(device) * 0.02
        self.ctx = torch.nn.Parameter(start)
        self.optimizer = torch.optim.SGD([self.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(0)
        size = getattr(model.visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size  # RN50: 224
        self.images = torch.randn(batch, 3, size, size, generator=generator).to(device)  # augmented and normalised
        self.labels = torch.randint(len(classnames), (batch,), generator=generator).to(device)
        self.teacher = teacher
        self.teacher_text_per_step = teacher_text_per_step
        self.lam = lam
        self.scale = model.logit_scale.exp()
        self.rows = torch.arange(len(classnames), device=device)
        self.eot = self.tokens.argmax(dim=-1)

    def image_features(self) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.model.encode_image(self.images), dim=-1)

    def __call__(self) -> None:
        if self.coop:
            return self.coop_step()
        model = self.model
        student_images = self.image_features()  # the student CLIP's frozen image encoder
        teacher_images = self.image_features()  # the zero-shot teacher CLIP's image encoder
        x = torch.cat([self.embedded[:, :1], self.ctx.expand(len(self.rows), -1, -1), self.embedded[:, 1 + N_CTX :]], 1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        text = model.ln_final(x)[self.rows, self.eot] @ model.text_projection
        if self.teacher_text_per_step:
            with torch.no_grad():
                teacher_text = F.normalize(model.encode_text(self.teacher_tokens), dim=-1)
        else:
            teacher_text = self.teacher
        logits = self.scale * student_images @ F.normalize(text, dim=-1).T
        loss_ce = F.cross_entropy(logits, self.labels)
        teacher_probs = (self.scale * teacher_images @ teacher_text.T).softmax(dim=-1)
        loss_kl = F.kl_div(logits.log_softmax(dim=-1), teacher_probs, reduction="batchmean")
        (g_d,) = torch.autograd.grad(loss_ce, self.ctx, retain_graph=True)
        (g_g,) = torch.autograd.grad(loss_kl, self.ctx)
        dot = (g_d * g_g).sum()
        grad = g_d - self.lam * dot / (g_g * g_g).sum() * g_g if dot < 0 else g_d
        self.optimizer.zero_grad()
        self.ctx.grad = grad
        self.optimizer.step()

    def coop_step(self) -> None:
        """CoOp's released step: the image tower once, the 77-token text tower with grad, one backward, SGD."""
        model = self.model
        images = self.image_features()
        x = torch.cat([self.embedded[:, :1], self.ctx.expand(len(self.rows), -1, -1), self.embedded[:, 1 + N_CTX :]], 1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        text = model.ln_final(x)[self.rows, self.eot] @ model.text_projection
        loss = F.cross_entropy(self.scale * images @ F.normalize(text, dim=-1).T, self.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def build_engine(clip, classnames, teacher, p: int, features: torch.Tensor, labels: torch.Tensor) -> LockstepEngine:
    """P ProGrad runs (seeds 1..P) of OxfordPets on cached features, ready to step."""
    encoder = PromptEncoder(clip, classnames, n_ctx=N_CTX, prompt_prefix=PREFIX)
    runs = []
    for seed in range(1, p + 1):
        config = resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=16, seed=seed))
        schedule = Schedule(len(labels), config.batch_size, config.epochs, config.lr, config.warmup_lr)
        generator = torch.Generator().manual_seed(seed)
        runs.append(RunState(config, torch.arange(len(labels)), labels, schedule, generator, teacher="zs"))
    contexts = encoder.initial_context("template").expand(p, -1, -1).clone()
    return LockstepEngine(encoder, features, runs, contexts, {"zs": teacher}, clip.logit_scale)


def shared_prefix_tokens(encoder: PromptEncoder) -> int:
    buckets = encoder._plan(tuple(range(encoder.num_classes)))
    return encoder.prefix_length + sum(b.length * b.classes.numel() for b in buckets)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1, 4, 15], help="fastprompt's P (default 1 4 15)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every variant runs (cpu)")
    parser.add_argument("--model", default="RN50", help="open_clip model, random weights (default RN50)")
    parser.add_argument("--classes", type=int, default=None, help="the first N OxfordPets classes (default all 37)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.csv", help="CSV to append rows to")
    parser.add_argument(
        "--sub-batch",
        type=int,
        default=None,
        help="also time each P above N as consecutive steps of engines of at most N runs",
    )
    parser.add_argument("--skip-reference", action="store_true", help="time fastprompt only (no speed-up columns)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory in the process, as `fastprompt train` on the CPU does",
    )
    parser.add_argument("--note", default="", help="appended to every row's note (e.g. the allocator's settings)")
    return parser.parse_args(argv)


def runs_of(variant: str) -> int:
    """P of a fastprompt variant ("fastprompt_P45", "fastprompt_P45_sub15"); 1 for the others."""
    return int(variant.split("_")[1][1:]) if variant.startswith("fastprompt_P") else 1


def counting_faults(fn, faults: list[int]):
    """`fn`, recording the minor page faults of each call (fresh pages the kernel maps and zeroes)."""

    def call():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return call


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep_freed_memory:
        from fastprompt.train.memory import keep_freed_memory

        kept = keep_freed_memory()
        args.note = "; ".join(filter(None, [args.note, f"freed memory kept (keep_freed_memory: {kept})"]))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    clip = load_clip(args.model, device=args.device, quick_gelu=True)  # random weights; OpenAI's network (QuickGELU)
    classnames = load_classnames(args.prompts, "OxfordPets")[: args.classes]
    k = len(classnames)
    teacher = zero_shot_weights(clip, classnames, TEMPLATE)
    embed_dim = teacher.shape[1]
    features = torch.randn(16 * k, 1, embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16 * k) % k  # the engine moves the features to the encoder's device; its indices stay here

    variants = {}
    if not args.skip_reference:
        variants["reference_issue"] = ReferenceStep(clip, classnames, teacher, args.batch, teacher_text_per_step=True)
        variants["reference_released"] = ReferenceStep(clip, classnames, teacher, args.batch, False)
    engines = {p: build_engine(clip, classnames, teacher, p, features, labels) for p in sorted(args.contexts)}
    faults: dict[str, list[int]] = {}
    for p, engine in engines.items():
        variants[f"fastprompt_P{p}"] = engine.step
        if args.sub_batch and p > args.sub_batch:  # what `_sweep` does with groups larger than its chunk
            sizes = [min(args.sub_batch, p - start) for start in range(0, p, args.sub_batch)]
            parts = [build_engine(clip, classnames, teacher, size, features, labels) for size in sizes]
            variants[f"fastprompt_P{p}_sub{args.sub_batch}"] = lambda parts=parts: [part.step() for part in parts]
    for name in [name for name in variants if name.startswith("fastprompt_P")]:
        faults[name] = []
        variants[name] = counting_faults(variants[name], faults[name])
    if not args.skip_reference:  # a component of the reference, for the explanation
        variants["image_tower_x1"] = variants["reference_released"].image_features
    if args.device == "cuda":  # a call's time is until its work is done on the device
        variants = {name: (lambda fn=fn: (fn(), torch.cuda.synchronize())) for name, fn in variants.items()}
    print(f"Timing {', '.join(variants)} ({args.repeats} rounds after one warm-up step each)...", flush=True)
    times = interleaved(variants, args.repeats, warmup=1)

    tokens_sp = shared_prefix_tokens(next(iter(engines.values())).encoder)
    tokens_full = k * 77
    rn50 = args.model == "RN50"
    image_gflops, token_gflops = (IMAGE_GFLOPS, TOKEN_GFLOPS) if rn50 else (float("nan"), float("nan"))
    predicted = {  # GFLOP per run-step
        "reference_issue": 2 * args.batch * image_gflops + 4 * tokens_full * token_gflops,
        "reference_released": 2 * args.batch * image_gflops + 3 * tokens_full * token_gflops,
        "image_tower_x1": args.batch * image_gflops,
    }
    for name in times:
        if name.startswith("fastprompt_P"):
            predicted[name] = 3 * tokens_sp * token_gflops  # forward + two cotangents, per run
    per_run = {name: median(values) / runs_of(name) for name, values in times.items()}
    reference = {name: per_run.get(name) for name in ("reference_issue", "reference_released")}
    notes = {
        "reference_issue": "2 image-tower passes + student 37x77 fwd + 2 backward + teacher 37x77 fwd",
        "reference_released": "as reference_issue, teacher text computed once at init",
        "image_tower_x1": "component: one RN50 image-tower forward on the batch, no grad",
    }
    rows = []
    for name, values in times.items():
        p = runs_of(name)
        is_step = name != "image_tower_x1" and reference["reference_issue"] is not None
        speedup = per_run["reference_issue"] / per_run[name] if is_step else None
        predicted_speedup = predicted["reference_issue"] / predicted[name] if is_step and rn50 else None
        note = notes.get(name, f"LockstepEngine.step, {p} ProGrad run(s), shared prefix {tokens_sp} tokens/run")
        if "_sub" in name:
            note += f", as consecutive steps of engines of at most {args.sub_batch} runs"
        if faults.get(name):
            note += f"; minor page faults per step (median) {statistics.median(faults[name][1:] or faults[name]):.0f}"
        rows.append(
            {
                "variant": name,
                "P": p,
                "K": k,
                "batch": args.batch,
                "median_s": f"{median(values):.4g}",
                "repeats": len(values),
                "s_per_run_step": f"{per_run[name]:.4g}",
                "speedup_vs_issue": f"{speedup:.2f}" if speedup else "",
                "speedup_vs_released": f"{reference['reference_released'] / per_run[name]:.2f}" if is_step else "",
                "predicted_gflop_per_run_step": f"{predicted[name]:.1f}",
                "predicted_speedup_vs_issue": f"{predicted_speedup:.2f}" if predicted_speedup else "",
                "measured_over_predicted": f"{speedup / predicted_speedup:.2f}" if predicted_speedup else "",
                "gflops_per_s": f"{predicted[name] / per_run[name]:.1f}",
                "times_s": " ".join(f"{t:.3g}" for t in values),
                "note": ("" if rn50 else f"model {args.model}; ") + note + (f"; {args.note}" if args.note else ""),
            }
        )
    columns = ["variant", "P", "median_s", "s_per_run_step", "speedup_vs_issue", "speedup_vs_released",
               "predicted_speedup_vs_issue", "measured_over_predicted", "gflops_per_s"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
