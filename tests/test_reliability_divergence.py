"""A run that diverges is marked failed with the step where it diverged, and no other run of its group notices.

A NaN is injected into one run at a seeded random step, either into its context (it then flows through the batched
encoder forward, the class-chunk path, the heads and the batched backward) or into its gradient inside the update
(through the fused update's shared buffers). Until the step at which the engine finds the failure (the end of the
epoch, where it reads its flags) the group is the same as in the sweep without the NaN, and every other run's context
and momentum are bit-identical to that sweep's after every step. After that the failed run leaves the group; a
smaller group rounds differently in the encoder's matrix products (a group of P runs is not bit-identical to P - 1,
see test_batched_runs_equal_runs_alone), so from there the runs are compared with the sweep without the failed run by
the suite's numerics helper, with equal accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import zlib

import pytest
import torch
from fastprompt.kernels.prograd_update import (
    prograd_update,
    prograd_update_cpu,
    prograd_update_loop,
    prograd_update_ref,
)
from numerics import assert_close
from safetensors.torch import load_file
from test_train_sweep import FakeCache

from fastprompt.clip import load_clip
from fastprompt.train.config import RunConfig, expand_sweep, resolve
from fastprompt.train.engine import LockstepEngine
from fastprompt.train.sweep import SweepOptions, run_sweep

EPOCHS, ITERATIONS = 3, 5  # 40 images (8 shots x 5 classes) in batches of 8
TOTAL = EPOCHS * ITERATIONS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


class Recorder:
    """Wraps LockstepEngine.step: snapshots of (contexts, momenta) before the first step and after each, and a NaN
    written into engine run 0's context just before step `poison_step` (mode "context")."""

    def __init__(self, poison_step: int | None = None) -> None:
        self.poison_step = poison_step
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.engine: LockstepEngine | None = None

    def install(self, monkeypatch) -> None:
        original = LockstepEngine.step

        def step(engine: LockstepEngine) -> list[int]:
            if not self.snapshots:
                self.engine = engine
                self.snapshots.append((engine.params.clone(), engine.momentum_buf.clone()))
            if self.poison_step == len(self.snapshots):
                engine.params[: engine.segment] = float("nan")
            stepped = original(engine)
            if stepped:
                self.snapshots.append((engine.params.clone(), engine.momentum_buf.clone()))
            return stepped

        monkeypatch.setattr(LockstepEngine, "step", step)

    def run(self, index: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Engine run `index`'s (context, momentum) after `after` steps."""
        segment = slice(index * self.engine.segment, (index + 1) * self.engine.segment)
        params, momentum = self.snapshots[after]
        return params[segment], momentum[segment]


class NaNInUpdate:
    """An update_fn that puts a NaN into the first segment's (the group's run 0) gradient at its `step`-th call."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, param, momentum_buf, g_d, g_g, offsets, *rest):
        self.calls += 1
        if self.calls == self.step:
            g_d = g_d.clone()
            g_d[int(offsets[0]) : int(offsets[1])] = float("nan")
        return prograd_update_cpu(param, momentum_buf, g_d, g_g, offsets, *rest)


def _result(folder, run_id: str) -> dict:
    return json.loads((folder / run_id / "result.json").read_text())


def _prompt(folder, run_id: str) -> torch.Tensor:
    return load_file(folder / run_id / "prompt.safetensors")["ctx"]


def _log(folder, run_id: str) -> list[dict]:
    return [json.loads(line) for line in (folder / run_id / "log.jsonl").read_text().splitlines()]


CASES = [  # method (coop: no teacher; prograd: projection; kd: G_d + alpha G_g), class chunk, where the NaN goes
    ("coop", None, "context"),
    ("prograd", 2, "context"),
    ("kd", None, "context"),
    ("prograd", None, "update"),
    ("kd", None, "update"),
]


@pytest.mark.parametrize(("method", "class_chunk", "mode"), CASES)
def test_diverged_run_fails_at_its_step_and_no_other_run_notices(tiny, tmp_path, monkeypatch, method, class_chunk,
                                                                 mode):  # fmt: skip
    poison = random.Random(zlib.crc32(f"{method}-{class_chunk}-{mode}".encode())).randint(1, TOTAL)  # seeded
    found = math.ceil(poison / ITERATIONS) * ITERATIONS  # the end of the epoch of the poisoned step
    cache = FakeCache(seed=3, per_class=14)
    fixed = {"dataset": "OxfordPets", "epochs": EPOCHS, "shots": 8, "batch_size": 8}
    configs = expand_sweep({"method": [method], "seed": [1, 2, 3]}, fixed)
    bad, others = configs[0].run_id, [c.run_id for c in configs[1:]]
    # The CPU path of the update, as a CPU sweep runs it; the fused kernels (interpreted here, slowly) are checked
    # segment by segment in test_nan_in_one_segment_of_the_update_stays_there.
    options = SweepOptions(progress=False, class_chunk=class_chunk, update_fn=prograd_update_cpu)
    what = f"{method}, chunk {class_chunk}, NaN in the {mode} at step {poison}"

    clean = Recorder()
    clean.install(monkeypatch)
    run_sweep(cache, tiny, configs, tmp_path / "clean", options)
    poisoned = Recorder(poison if mode == "context" else None)
    poisoned.install(monkeypatch)
    update_fn = NaNInUpdate(poison) if mode == "update" else options.update_fn
    records = run_sweep(cache, tiny, configs, tmp_path / "poisoned", dataclasses.replace(options, update_fn=update_fn))
    monkeypatch.undo()
    without = run_sweep(cache, tiny, configs[1:], tmp_path / "without", options)

    # The failed run: its step, the step where it was found, its last finite context, only its healthy epochs logged.
    status = {r["run_id"]: r["status"] for r in records}
    assert status == {bad: "failed", **{run_id: "done" for run_id in others}}, what
    result = _result(tmp_path / "poisoned", bad)
    epoch = (poison - 1) // ITERATIONS + 1
    assert result["divergence"] == {"step": poison, "epoch": epoch, "detected_at_step": found}, what
    assert f"at step {poison} (epoch {epoch}), found at step {found}" in result["reason"]
    assert [r["epoch"] for r in _log(tmp_path / "poisoned", bad)] == list(range(1, epoch))
    if mode == "update":  # the update that made the context NaN was not kept: it is the context after step s - 1
        saved = _prompt(tmp_path / "poisoned", bad)
        assert torch.equal(saved, clean.run(0, poison - 1)[0].view_as(saved)), what

    # Every other run: bit-identical to the sweep without the NaN after every step the NaN spent in the group...
    for index in (1, 2):
        for after in range(1, found + 1):
            pairs = zip(("context", "momentum"), poisoned.run(index, after), clean.run(index, after), strict=True)
            for name, mine, theirs in pairs:
                assert torch.equal(mine, theirs), f"{what}: run {index}'s {name} differs after step {after}"
    for run_id in others:
        epochs_together = found // ITERATIONS
        logs = [_log(tmp_path / folder, run_id)[:epochs_together] for folder in ("poisoned", "clean")]
        assert logs[0] == logs[1], what
    # ... and at the end the same as in a sweep without the failed run (bit-identical where it failed in the last
    # epoch, so that the group never changed).
    alone = {r["run_id"]: r["accuracy"] for r in without}
    for run_id in others:
        mine, theirs = _prompt(tmp_path / "poisoned", run_id), _prompt(tmp_path / "without", run_id)
        assert_close(mine, theirs, what=f"{what}: {run_id}")
        assert _result(tmp_path / "poisoned", run_id)["metrics"]["accuracy"] == alone[run_id], what
        if found == TOTAL:
            assert torch.equal(mine, _prompt(tmp_path / "clean", run_id)), what
    lines = [json.loads(line) for line in (tmp_path / "poisoned" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run_id"] for r in lines) == sorted([bad, *others])


def test_overflowing_run_keeps_its_last_finite_context(tiny, tmp_path):
    """A learning rate that overflows: the run fails at the step whose update overflowed, not later, and its saved
    prompt is the finite context from before that step (not the inf/NaN one)."""
    cache = FakeCache(seed=3)
    configs = expand_sweep({"method": ["coop"], "seed": [1, 2], "shots": [2]}, {"dataset": "OxfordPets", "epochs": 4})
    bad = resolve(RunConfig(**{**configs[0].__dict__, "lr": 1e38, "warmup_lr": 1e38, "seed": 1}))
    run_sweep(cache, tiny, [bad, configs[1]], tmp_path, SweepOptions(progress=False, update_fn=prograd_update_cpu))
    result = _result(tmp_path, bad.run_id)
    assert result["status"] == "failed" and result["divergence"]["step"] <= result["divergence"]["detected_at_step"]
    assert torch.isfinite(_prompt(tmp_path, bad.run_id)).all()


# ------------------------------------------------------------------------------- the update's shared flat buffers
UPDATES = {
    "prograd_update": prograd_update,  # the fused kernels (Triton; interpreted on a CPU), else the CPU path
    "prograd_update_cpu": prograd_update_cpu,
    "prograd_update_ref": prograd_update_ref,
    "prograd_update_loop": prograd_update_loop,
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(UPDATES))
def test_nan_in_one_segment_of_the_update_stays_there(name, device):
    """NaN in one segment's gradients, parameters and momentum: every other segment's update and statistics are
    bit-identical to the same call with finite values there. Nine segments of one length (the CPU path's
    family-at-a-time branch) and three of other lengths (one spanning several kernel chunks)."""
    update = UPDATES[name]
    if device == "cuda" and name == "prograd_update_cpu":
        pytest.skip("the CPU path takes CPU tensors only")
    generator = torch.Generator().manual_seed(7)
    lengths = [96] * 9 + [5, 1000, 70000]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    n, s = int(offsets[-1]), len(lengths)
    inputs = {
        "param": torch.randn(n, generator=generator),
        "momentum_buf": torch.randn(n, generator=generator),
        "g_d": torch.randn(n, generator=generator),
        "g_g": torch.randn(n, generator=generator),
    }
    per_segment = {
        "lam": torch.rand(s, generator=generator),
        "lr": torch.rand(s, generator=generator) * 1e-2,
        "momentum": torch.full((s,), 0.9),
        "weight_decay": torch.full((s,), 5e-4),
        "first_step": torch.rand(s, generator=generator) < 0.3,
    }
    for poisoned_segment in (3, 10):  # one of the family, and the long one
        piece = slice(int(offsets[poisoned_segment]), int(offsets[poisoned_segment + 1]))
        outputs = []
        for poison in (False, True):
            tensors = {key: value.clone().to(device) for key, value in inputs.items()}
            if poison:
                for value in tensors.values():
                    value[piece] = float("nan")
            stats = update(tensors["param"], tensors["momentum_buf"], tensors["g_d"], tensors["g_g"],
                           offsets.to(device), *(value.to(device) for value in per_segment.values()))  # fmt: skip
            outputs.append((tensors["param"].cpu(), tensors["momentum_buf"].cpu(), [t.cpu() for t in stats]))
        keep = torch.ones(n, dtype=torch.bool)
        keep[piece] = False
        others = torch.arange(s) != poisoned_segment
        (param, momentum, stats), (param_nan, momentum_nan, stats_nan) = outputs
        assert torch.equal(param[keep], param_nan[keep]) and torch.equal(momentum[keep], momentum_nan[keep]), name
        for field, clean, dirty in zip(("dot", "gg_sq", "gd_sq", "cos", "conflict"), stats, stats_nan, strict=True):
            assert torch.equal(clean[others], dirty[others]), f"{name}: {field} of another segment changed"
