"""The data pipeline of training (PROTOCOL.md section 4) with several batches per epoch and several cached views.

Four rules, written here independently of the engine:
- every epoch, a fresh random permutation of the run's images;
- every epoch, one cached view per image, drawn uniformly from the V views;
- the learning rate changes once per epoch: 1e-5 in epoch 0, then 0.001 * (1 + cos(pi * (e - 1) / E));
- floor(N / 32) batches of 32 per epoch when N >= 32 (the last partial batch is dropped); one batch of all N if N < 32.

Two kinds of test. The trajectory test trains with a plain reference trainer (open_clip's 77-token text path, two
backward passes, torch.optim.SGD, its own loop over epochs and batches) that follows the engine's documented random
contract: each run owns a `torch.Generator` seeded with the run's seed, and at the start of every epoch draws
`order = torch.randperm(n, generator=g)` and then `views = torch.randint(V, (n,), generator=g)`; batch b is
`order[b * B:(b + 1) * B]` (B = min(32, n)) and image i of the run is read in view `views[i]`. The property tests do not
depend on that contract: they record what a sweep actually draws and steps with, over many epochs, and check the rules.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_cache import Split as _Split
from fake_cache import Subset as _Subset
from fastprompt.kernels.prograd_update import prograd_update_ref
from numerics import assert_close, relative_error

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.train.config import RunConfig, Schedule, expand_sweep, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.sweep import SweepOptions, run_sweep
from fastprompt.zeroshot import zero_shot_weights

NAMES = ["abyssinian", "basset hound", "great pyrenees", "sphynx", "yorkshire terrier"]
TEMPLATE = "a type of pet, a photo of a {}."
PREFIX = "a type of pet, a photo of a"
VIEWS = 4
BATCH = 32


def protocol_lr(epoch: int, epochs: int) -> float:
    """PROTOCOL.md section 4, written out: warm-up epoch at 1e-5, then the cosine, once per epoch."""
    return 1e-5 if epoch == 0 else 0.001 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def protocol_batches(n: int) -> tuple[int, int]:
    """(batches per epoch, batch size): drop the last partial batch; one batch of all n when n < 32."""
    return (n // BATCH, BATCH) if n >= BATCH else (1, n)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


# ---------------------------------------------------------------------------------------------- trajectory
@dataclass
class Run:
    method: str
    seed: int
    epochs: int
    rows: torch.Tensor  # (n,) rows of the feature table
    labels: torch.Tensor  # (n,)


def reference_training(clip, features: torch.Tensor, teacher: torch.Tensor, run: Run) -> torch.Tensor:
    """One run trained alone by PROTOCOL.md written plainly; returns its final context (16, W)."""
    model = clip.model
    head = "X " * (16 - len(PREFIX.split())) + PREFIX
    tokens = clip.tokenizer([f"{head} {name}." for name in NAMES])
    with torch.no_grad():
        embedded = model.token_embedding(tokens)
    start = embedded[0, 1:17].clone()
    start[: 16 - len(PREFIX.split())] = 0.0
    ctx = torch.nn.Parameter(start)
    optimizer = torch.optim.SGD([ctx], lr=1e-5, momentum=0.9, weight_decay=5e-4)
    scale = model.logit_scale.exp()
    generator = torch.Generator().manual_seed(run.seed)
    n = run.rows.numel()
    batches, size = protocol_batches(n)
    for epoch in range(run.epochs):
        for group in optimizer.param_groups:
            group["lr"] = protocol_lr(epoch, run.epochs)
        order = torch.randperm(n, generator=generator)
        views = torch.randint(VIEWS, (n,), generator=generator)
        for batch in range(batches):
            items = order[batch * size : (batch + 1) * size]
            images = F.normalize(features[run.rows[items], views[items]], dim=-1)
            labels = run.labels[items]
            x = torch.cat([embedded[:, :1], ctx.expand(len(NAMES), -1, -1), embedded[:, 17:]], dim=1)
            x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
            x = model.ln_final(x)[torch.arange(len(NAMES)), tokens.argmax(dim=-1)] @ model.text_projection
            logits = scale * images @ F.normalize(x, dim=-1).T
            loss_ce = F.cross_entropy(logits, labels)
            if run.method == "coop":
                (grad,) = torch.autograd.grad(loss_ce, ctx)
            else:
                teacher_probs = (scale * images @ teacher.T).softmax(dim=-1)
                loss_kl = -(teacher_probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
                (g_d,) = torch.autograd.grad(loss_ce, ctx, retain_graph=True)
                (g_g,) = torch.autograd.grad(loss_kl, ctx)
                dot = (g_d * g_g).sum()
                grad = g_d - dot / (g_g * g_g).sum() * g_g if dot < 0 else g_d
            optimizer.zero_grad()
            ctx.grad = grad
            optimizer.step()
    return ctx.detach()


def test_runs_with_several_batches_and_views_equal_plain_trainer(clip):
    """A 70-image ProGrad run (2 batches of 32 per epoch, 6 dropped) and a 20-image CoOp run (one batch of 20) over 4
    distinct cached views, trained together in the engine, each equal the plain trainer's run alone."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(90, VIEWS, 64, generator=generator)  # every view differs: the wrong view changes results
    subsets = [torch.randperm(90, generator=generator)[:n] for n in (70, 20)]  # rows of the table, not 0..n-1
    runs = [
        Run("prograd", 1, 4, subsets[0], torch.randint(5, (70,), generator=generator)),
        Run("coop", 2, 5, subsets[1], torch.randint(5, (20,), generator=generator)),
    ]
    teacher = zero_shot_weights(clip, NAMES, TEMPLATE)
    encoder = PromptEncoder(clip, NAMES, n_ctx=16, prompt_prefix=PREFIX)
    states = []
    for run in runs:
        config = resolve(RunConfig(method=run.method, dataset="OxfordPets", seed=run.seed, epochs=run.epochs, lam=1.0,
                                   init="template"))  # fmt: skip
        schedule = Schedule(run.rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr)
        seeded = torch.Generator().manual_seed(run.seed)
        states.append(RunState(config, run.rows, run.labels, schedule, seeded, None if run.method == "coop" else "zs"))
    start = encoder.initial_context("template")
    engine = LockstepEngine(encoder, features, states, torch.stack([start, start]), {"zs": teacher}, clip.logit_scale,
                            update_fn=prograd_update_ref)  # fmt: skip
    while engine.step():
        pass
    assert [state.step for state in states] == [4 * 2, 5 * 1]
    assert all(engine.collect(index) for index in range(len(runs)))
    assert states[0].totals["conflicts"] > 0, "the test should exercise the projection"
    for index, run in enumerate(runs):
        expected = reference_training(clip, features, teacher, run)
        moved = relative_error(expected, start)
        assert moved > 1e-3, f"run {index} barely trained ({moved:.2g}): the comparison would not see a wrong step"
        assert_close(engine.context(index), expected, what=f"{run.method} run {index} after {run.epochs} epochs")


# ---------------------------------------------------------------------------------------------- properties


class ViewCache:
    """An in-memory FeatureCache stand-in: 5 classes x 14 training images with 4 cached views each."""

    per_class = 14

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        k, n = len(NAMES), len(NAMES) * self.per_class
        self.path = Path("memory")
        self.dataset = "OxfordPets"
        self.classnames = list(NAMES)
        self.manifest = {"model": {"name": "fastprompt-tiny"}, "views": VIEWS, "templates": {"prograd": TEMPLATE}}
        self._splits = {
            name: _Split(
                torch.randn(count, views, 64, generator=generator),
                torch.arange(count) % k,
                [f"{name}{i}" for i in range(count)],
            )
            for name, count, views in (("train", n, VIEWS), ("val", k, 1), ("test", 20, 1))
        }

    def split(self, name):
        return self._splits[name]

    def fewshot(self, shots, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = self._splits["train"].labels
        chosen = torch.cat([(labels == c).nonzero()[:, 0][torch.randperm(self.per_class, generator=generator)[:shots]]
                            for c in range(len(NAMES))])  # fmt: skip
        return _Subset(chosen, torch.arange(len(NAMES)), [f"t{i}" for i in chosen.tolist()], [])


@dataclass
class Step:
    rows: list[int]
    views: list[int]
    lr: float


def record_sweep(clip, configs, out_dir: Path, monkeypatch) -> dict[str, list[Step]]:
    """Run a sweep and record, per run and per optimisation step, the batch it drew and the rate it stepped with.

    Within one engine step the active runs draw their batches in order, then one update call steps them all: the
    update's per-segment learning rates belong to the runs that drew since the previous update.
    """
    drawn: list[tuple[str, list[int], list[int]]] = []
    steps: dict[str, list[Step]] = defaultdict(list)
    next_batch = RunState.next_batch

    def recording_next_batch(self, num_views):
        rows, views, labels = next_batch(self, num_views)
        drawn.append((self.config.run_id, rows.tolist(), views.tolist()))
        return rows, views, labels

    def recording_update(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step):
        assert lr.numel() == len(drawn), "one learning rate per run that drew a batch"
        for (run_id, rows, views), rate in zip(drawn, lr.tolist(), strict=True):
            steps[run_id].append(Step(rows, views, rate))
        drawn.clear()
        return prograd_update_ref(param, momentum_buf, g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)

    monkeypatch.setattr(RunState, "next_batch", recording_next_batch)
    records = run_sweep(ViewCache(), clip, configs, out_dir, SweepOptions(progress=False, update_fn=recording_update))
    assert all(record["status"] == "done" for record in records) and not drawn
    return steps


def test_batches_views_and_rates_follow_protocol(clip, tmp_path, monkeypatch):
    """Over many epochs: disjoint full batches, floor(N/32) per epoch, a fresh order every epoch, views uniform and
    independent per image and epoch, one learning rate per epoch by the formula. Two runs in lock-step: 70 images
    (2 batches, 6 dropped) for 30 epochs and 20 images (one batch of all 20) for 45 epochs."""
    fixed = {"dataset": "OxfordPets", "method": "prograd", "lambda": 1.0}
    configs = [*expand_sweep({"shots": [14], "seed": [1]}, {**fixed, "epochs": 30}),
               *expand_sweep({"shots": [4], "seed": [2]}, {**fixed, "epochs": 45})]  # fmt: skip
    steps = record_sweep(clip, configs, tmp_path, monkeypatch)
    cache = ViewCache()
    for config in configs:
        run_rows = set(cache.fewshot(config.shots, config.seed).train_index.tolist())
        n = len(run_rows)
        batches, size = protocol_batches(n)
        record = steps[config.run_id]
        assert len(record) == config.epochs * batches, f"{config.run_id}: {len(record)} steps for N = {n}"
        orders, view_of = [], defaultdict(list)  # view_of: image -> its view in each epoch it was used
        for epoch in range(config.epochs):
            epoch_steps = record[epoch * batches : (epoch + 1) * batches]
            rows = [row for step in epoch_steps for row in step.rows]
            assert all(len(step.rows) == size for step in epoch_steps), f"epoch {epoch}: a batch is not of size {size}"
            assert len(set(rows)) == len(rows) == batches * size, f"epoch {epoch}: batches overlap"
            assert set(rows) <= run_rows, f"epoch {epoch}: images from outside the run's subset"
            orders.append(tuple(rows))
            for step in epoch_steps:
                assert math.isclose(step.lr, protocol_lr(epoch, config.epochs), rel_tol=1e-6), (
                    f"epoch {epoch}: lr {step.lr} != {protocol_lr(epoch, config.epochs)}"
                )
                assert len(set(step.views)) > 1, f"epoch {epoch}: one view for the whole batch"
                for row, view in zip(step.rows, step.views, strict=True):
                    view_of[row].append(view)
        assert len(set(orders)) == config.epochs, "the image order repeats across epochs"
        if n >= BATCH:  # a fresh permutation: the dropped images change, so every image is used sooner or later
            assert set(view_of) == run_rows
        counts = Counter(view for views in view_of.values() for view in views)
        assert set(counts) <= set(range(VIEWS))
        total = sum(counts.values())
        chi_square = sum((counts[v] - total / VIEWS) ** 2 / (total / VIEWS) for v in range(VIEWS))
        assert chi_square < 30, f"views are not uniform: {dict(counts)} (chi-square {chi_square:.1f}, 3 dof)"
        for row, views in view_of.items():  # a fresh view per epoch, not one view per image for the whole run
            assert len(set(views)) > 1, f"image {row} saw only view {views[0]} in {len(views)} epochs"
