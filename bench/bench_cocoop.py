"""CoCoOp training step on the CPU: the batched shared-prefix engine against the release's per-image 77-token step.

Both sides use the same RN50 CLIP (open_clip "RN50", random weights, QuickGELU as OpenAI's network, fp32; text tower
12 x 512, 1024-d image features), the 37 OxfordPets classes and CoCoOp's release configuration (n_ctx 4, batch 1;
OxfordPets' 8-word template does not fit 4 vectors, so the context starts from "a photo of a", `init_fallback`).

- release: what the release's CoCoOp trainer does per step for one image (its batch size is 1), written plainly on
  the open_clip model: the meta-net on the normalised image feature, the 37 full prompts of 77 tokens with the shifted
  context through the text transformer, cross-entropy, backward, torch.optim.SGD over the context and the meta-net.
  The image tower is not timed (it favours the release: fastprompt reads cached features).
- release_prograd: the same with ProGrad's rule: the teacher's logits from cached zero-shot weights, two gradients of
  one forward (retain_graph), the per-tensor projection loop, SGD.
- fastprompt P x B: `CocoopEngine.step()` for P runs of batch B on cached, normalised features: one shared-prefix
  encoder pass over the P x B per-image contexts (5 prefix tokens each, then every class's suffix), one batched VJP,
  the meta-net's backward, the update over 5 segments per run. Time per training image = step time / (P x B).

A correctness check runs first (and warms up): one release step and one engine step from the same initial tensors on
the same image must agree to the suite's fp32 tolerance (the tensors' changes, relative RMS <= 1e-5).

Memory: the bytes autograd keeps for the backward during the forward of one step (counted with
`saved_tensors_hooks`, weights excluded) for one run of batch B, on both paths: the release keeps B x 37 x 77 token
rows per layer; the engine keeps each image's prefix and its 37 suffixes, so its bytes per image stay flat in B and
are a fraction (suffix tokens / 77) of the release's.

Usage:
    python bench/bench_cocoop.py                     # about 5 minutes on 2 loaded CPU cores, 1 thread
    python bench/bench_cocoop.py --repeats 5 --runs 1 8 --out cocoop_trial.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, interleaved, load_classnames, median

from fastprompt.clip import load_clip
from fastprompt.templates import prograd_template
from fastprompt.train.cocoop import PARAMETER_NAMES, CocoopEngine, cocoop_encoder, conditioned_contexts, init_prefix
from fastprompt.train.config import RunConfig, Schedule, resolve
from fastprompt.train.engine import RunState
from fastprompt.zeroshot import zero_shot_weights

DATASET = "OxfordPets"
N_CTX = 4
FIELDS = [
    "kind", "variant", "P", "B", "K", "median_s_per_step", "repeats", "ms_per_image", "speedup_per_image",
    "tokens_per_image", "saved_bytes", "saved_bytes_per_image", "times_s", "note",
]  # fmt: skip


class ReleaseStep:
    """The release's CoCoOp step for a batch of images (a Python loop over images), plainly on the open_clip model."""

    def __init__(self, clip, classnames, words: str, initial: dict, teacher=None, lr: float = 1e-5) -> None:
        model = clip.model
        self.model, self.teacher, self.lam = model, teacher, 1.0
        n_words = len(words.split())
        prompts = [" ".join(["X"] * (N_CTX - n_words) + [words, f"{name}."]) for name in classnames]
        self.tokens = clip.tokenizer(prompts)
        with torch.no_grad():
            embedded = model.token_embedding(self.tokens)
        self.token_prefix, self.token_suffix = embedded[:, :1], embedded[:, 1 + N_CTX :]
        self.ctx = torch.nn.Parameter(initial["ctx"].clone())
        dim, hidden = initial["meta_net.linear1.weight"].shape[1], initial["meta_net.linear1.weight"].shape[0]
        layers = [("linear1", torch.nn.Linear(dim, hidden)), ("relu", torch.nn.ReLU(inplace=True)),
                  ("linear2", torch.nn.Linear(hidden, self.ctx.shape[1]))]  # fmt: skip
        self.meta_net = torch.nn.Sequential(OrderedDict(layers))
        with torch.no_grad():
            for name, param in self.meta_net.named_parameters():
                param.copy_(initial[f"meta_net.{name}"])
        self.params = [self.ctx, *self.meta_net.parameters()]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9, weight_decay=5e-4)
        self.scale = model.logit_scale.exp().detach()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        model, k = self.model, self.tokens.shape[0]
        rows = []
        for image in images:
            ctx_i = (self.ctx + self.meta_net(image)).unsqueeze(0).expand(k, -1, -1)
            x = torch.cat([self.token_prefix, ctx_i, self.token_suffix], dim=1) + model.positional_embedding
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
            text = x[torch.arange(k), self.tokens.argmax(dim=-1)] @ model.text_projection
            rows.append(self.scale * image @ F.normalize(text, dim=-1).T)
        return torch.stack(rows)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = self.logits(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad()
        if self.teacher is None:
            loss.backward()
        else:
            teacher_probs = (self.scale * images @ self.teacher.T).softmax(dim=-1)
            loss_kl = -(teacher_probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            g_d = torch.autograd.grad(loss, self.params, retain_graph=True)
            g_g = torch.autograd.grad(loss_kl, self.params)
            for param, grad_d, grad_g in zip(self.params, g_d, g_g, strict=True):
                dot = (grad_d * grad_g).sum()
                param.grad = grad_d - self.lam * dot / (grad_g * grad_g).sum() * grad_g if dot < 0 else grad_d
        self.optimizer.step()

    def tensors(self) -> dict:
        return {"ctx": self.ctx.detach()} | {f"meta_net.{n}": p.detach() for n, p in self.meta_net.named_parameters()}


def make_engine(clip, classnames, features, labels, teacher, runs, batch, method="cocoop", warmup_lr=1e-5):
    template = prograd_template(DATASET)
    encoder = cocoop_encoder(clip, classnames, template, n_ctx=N_CTX)
    states = []
    for seed in range(1, runs + 1):
        settings = dict(dataset=DATASET, shots=16, seed=seed, lam=1.0, n_ctx=N_CTX, init="template", epochs=1000)
        config = resolve(RunConfig(method=method, batch_size=batch, lr=0.002, warmup_lr=warmup_lr, **settings))
        rows = torch.arange(labels.numel())
        schedule = Schedule(rows.numel(), batch, config.epochs, config.lr, config.warmup_lr)
        teacher_key = "single" if method == "prograd_cocoop" else None
        states.append(RunState(config, rows, labels, schedule, torch.Generator().manual_seed(seed), teacher_key))
    return CocoopEngine(encoder, features, states, {"single": teacher}, clip.logit_scale, template=template)


def check(clip, classnames, features, labels, teacher, method: str) -> float:
    """One release step and one engine step (1 run, batch 1) on the same image: the relative error of the change.
    At a learning rate of 10, not the warm-up's 1e-5, so that the change is far above the tensors' rounding."""
    engine = make_engine(clip, classnames, features, labels, teacher, 1, 1, method, warmup_lr=10.0)
    start = engine.trained_tensors(0)
    words = init_prefix(prograd_template(DATASET), N_CTX)[0]
    release = ReleaseStep(clip, classnames, words, start, teacher if method == "prograd_cocoop" else None, lr=10.0)
    generator = torch.Generator().manual_seed(1)  # the run's first draw: its order and views of epoch 0
    order = torch.randperm(labels.numel(), generator=generator)
    views = torch.randint(features.shape[1], (labels.numel(),), generator=generator)
    first = order[:1]
    release(F.normalize(features[first, views[first]], dim=-1), labels[first])
    engine.step()
    errors = []
    for name in PARAMETER_NAMES:
        expected = (release.tensors()[name] - start[name]).double()
        actual = (engine.trained_tensors(0)[name] - start[name]).double()
        errors.append(float((actual - expected).norm() / expected.norm()))
    worst = max(errors)
    if not worst <= 1e-5:  # tests/numerics.py's fp32 floor
        raise SystemExit(f"{method}: engine and release disagree (relative error {worst:.3g}): not timed")
    return worst


def saved_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `fn` runs, `model`'s weights excluded."""
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(kept.values())


def engine_forward_bytes(engine, images: torch.Tensor, model: torch.nn.Module) -> int:
    """The engine's forward for one run's batch (meta-net, per-image contexts, shared-prefix encoder) with grad."""
    params = engine.params.view(len(engine.runs), -1)[:1].detach().requires_grad_(True)

    def forward():
        contexts = conditioned_contexts(engine.layout.split(params), images[None])[0]
        engine.encoder(contexts.detach().requires_grad_(True))

    return saved_bytes(forward, model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--runs", nargs="+", type=int, default=[1, 8], help="fastprompt's P at batch 1 (1 8)")
    parser.add_argument("--memory-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                        help="batch sizes of the memory rows (1 2 4 8 16; the release's only up to 2)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "cocoop_cpu.csv", help="CSV to append rows to")
    parser.add_argument("--note", default="", help="appended to every row's note (e.g. the machine's load)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    clip = load_clip("RN50", quick_gelu=True)  # random weights; OpenAI's network (QuickGELU), fp32
    classnames = load_classnames(args.prompts, DATASET)
    k = len(classnames)
    teacher = zero_shot_weights(clip, classnames, prograd_template(DATASET))
    features = torch.randn(16 * k, 2, teacher.shape[1], generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16 * k) % k
    for method in ("cocoop", "prograd_cocoop"):
        print(f"check {method}: relative error {check(clip, classnames, features, labels, teacher, method):.2e}")

    words = init_prefix(prograd_template(DATASET), N_CTX)[0]
    probe = make_engine(clip, classnames, features, labels, teacher, 1, 1)
    batch = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(2))[:1]
    images, batch_labels = F.normalize(features[batch, 0], dim=-1), labels[batch]
    variants = {
        "release": (ReleaseStep(clip, classnames, words, probe.trained_tensors(0)), 1, 1),
        "release_prograd": (ReleaseStep(clip, classnames, words, probe.trained_tensors(0), teacher), 1, 1),
    }
    for p in sorted(args.runs):
        variants[f"fastprompt_P{p}_B1"] = (make_engine(clip, classnames, features, labels, teacher, p, 1), p, 1)
        variants[f"fastprompt_prograd_P{p}_B1"] = (
            make_engine(clip, classnames, features, labels, teacher, p, 1, "prograd_cocoop"),
            p,
            1,
        )
    calls = {
        name: (lambda step=step: step(images, batch_labels)) if name.startswith("release") else step.step
        for name, (step, _, _) in variants.items()
    }
    print(f"Timing {', '.join(calls)} ({args.repeats} rounds after one warm-up step each)...", flush=True)
    times = interleaved(calls, args.repeats, warmup=1)

    encoder = probe.encoder
    buckets = encoder._plan(tuple(range(k)))
    engine_tokens = encoder.prefix_length + sum(b.length * b.classes.numel() for b in buckets)
    release_tokens = 77 * k
    per_image = {name: median(times[name]) / (p * b) for name, (_, p, b) in variants.items()}
    rows = []
    for name, (_, p, b) in variants.items():
        baseline = "release_prograd" if "prograd" in name else "release"
        rows.append({
            "kind": "time", "variant": name, "P": p, "B": b, "K": k,
            "median_s_per_step": f"{median(times[name]):.4g}", "repeats": len(times[name]),
            "ms_per_image": f"{1e3 * per_image[name]:.4g}",
            "speedup_per_image": f"{per_image[baseline] / per_image[name]:.2f}",
            "tokens_per_image": release_tokens if name.startswith("release") else engine_tokens,
            "times_s": " ".join(f"{t:.3g}" for t in times[name]),
            "note": f"speed-up vs {baseline}; {args.note}".strip("; "),
        })  # fmt: skip

    print("Counting the bytes kept for the backward...", flush=True)
    release = variants["release"][0]
    for b in args.memory_batches:
        chosen = torch.arange(b)
        batch_images = F.normalize(features[chosen, 0], dim=-1)
        measured = {"fastprompt": engine_forward_bytes(probe, batch_images, clip.model)}
        if b <= 2:  # the release's rows grow as B x 37 x 77: about 0.6 GB per image on RN50
            measured["release"] = saved_bytes(lambda images=batch_images: release.logits(images), clip.model)
        for name, value in measured.items():
            rows.append({
                "kind": "memory", "variant": name, "P": 1, "B": b, "K": k,
                "tokens_per_image": release_tokens if name == "release" else engine_tokens,
                "saved_bytes": value, "saved_bytes_per_image": value // b,
                "note": f"autograd's saved tensors in one step's forward, weights excluded; {args.note}".strip("; "),
            })  # fmt: skip
    columns = ["kind", "variant", "P", "B", "median_s_per_step", "ms_per_image", "speedup_per_image",
               "tokens_per_image", "saved_bytes_per_image"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
