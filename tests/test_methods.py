"""Methods as declarations (fastprompt/methods.py) and the prompt-side methods they add: KgCoOp's step against its
loss written plainly, angles logged for CoOp and KD (G_g computed, not used), training on the centre view, predictions
kept per run, a trained prompt as ProGrad's teacher, and the whole training split (shots 0)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_cache import Split, Subset
from fastprompt.kernels.prograd_update import prograd_update_ref
from numerics import assert_close
from safetensors.torch import load_file

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.errors import ConfigError, FastPromptError
from fastprompt.methods import METHODS
from fastprompt.train.config import RunConfig, Schedule, expand_sweep, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.sweep import SweepOptions, run_sweep
from fastprompt.zeroshot import zero_shot_weights

NAMES = ["abyssinian", "bengal", "boxer", "pug", "samoyed"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


class CenterCache:
    """An in-memory FeatureCache stand-in with augmented views, a centre view per training image and a validation
    split (the shape `fastprompt cache` writes, format 2)."""

    def __init__(self, seed: int = 0, per_class: int = 8, views: int = 3, full_train: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        k, n = len(NAMES), len(NAMES) * per_class
        self.path = Path("memory")
        self.dataset = "OxfordPets"
        self.classnames = list(NAMES)
        self.manifest = {"model": {"name": "fastprompt-tiny"}, "views": views, "templates": {}}
        self.manifest["full_train"] = full_train
        labels = torch.arange(n) % k
        self._splits = {
            "train": Split(torch.randn(n, views, 64, generator=generator), labels, [f"t{i}" for i in range(n)],
                           torch.randn(n, 64, generator=generator)),
            "val": Split(torch.randn(2 * k, 1, 64, generator=generator), torch.arange(2 * k) % k,
                         [f"v{i}" for i in range(2 * k)]),
            "test": Split(torch.randn(30, 1, 64, generator=generator), torch.arange(30) % k,
                          [f"x{i}" for i in range(30)]),
        }  # fmt: skip
        for name in ("val", "test"):
            self._splits[name].center = self._splits[name].features[:, 0]

    def split(self, name):
        return self._splits[name]

    def center_features(self, name, purpose="this"):
        return self._splits[name].center

    def fewshot(self, shots, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = self._splits["train"].labels
        members = [(labels == c).nonzero()[:, 0] for c in range(len(NAMES))]
        chosen = torch.cat([m[torch.randperm(len(m), generator=generator)[:shots]] for m in members])
        val = torch.arange(len(NAMES))
        return Subset(chosen, val, [f"t{i}" for i in chosen.tolist()], [f"v{i}" for i in val.tolist()])


# ------------------------------------------------------------------------------------------------- declarations
def test_every_method_is_declared_once_and_resolves():
    assert len(METHODS) == len(set(METHODS)) >= 20
    for name, declared in METHODS.items():
        config = resolve(RunConfig(method=name, dataset="OxfordPets", shots=4))
        assert config.declaration is declared
        assert config.uses_prompt == (declared.kind == "prompt")
        assert (config.lam_used > 0) == declared.projects
        assert (declared.knob == "lambda") == (f"-lam{config.lam:g}-" in config.run_id)


def test_method_defaults_apply_unless_the_user_sets_them():
    cocoop = resolve(RunConfig(method="cocoop", dataset="OxfordPets", shots=4))
    assert (cocoop.n_ctx, cocoop.batch_size, cocoop.epochs, cocoop.lr) == (4, 1, 10, 0.002)
    kgcoop = resolve(RunConfig(method="kgcoop", dataset="OxfordPets", shots=4))
    assert (kgcoop.n_ctx, kgcoop.batch_size, kgcoop.epochs, kgcoop.init) == (4, 128, 100, "template")
    coop = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=4))
    assert (coop.n_ctx, coop.batch_size, coop.epochs, coop.init) == (16, 32, 100, "random")
    mine = resolve(RunConfig(method="cocoop", dataset="OxfordPets", shots=4, n_ctx=8, batch_size=4, epochs=3))
    assert (mine.n_ctx, mine.batch_size, mine.epochs) == (8, 4, 3)


def test_run_ids_of_earlier_sweeps_are_unchanged():
    """Fields added later (teacher, augment, angles) stay out of the hash at their defaults: a sweep folder written
    before they existed resumes instead of training again (ids taken from the release before these fields)."""
    assert resolve(RunConfig(method="coop", dataset="EuroSAT", shots=1)).run_id == "coop-EuroSAT-1shot-seed1-919d38e9"
    prograd = resolve(RunConfig(method="prograd", dataset="EuroSAT", shots=16))
    assert prograd.run_id == "prograd-EuroSAT-16shot-seed1-lam0.8-13bd24cd"
    assert resolve(RunConfig(method="coop", dataset="EuroSAT", shots=1, angles=True)).run_id != (
        "coop-EuroSAT-1shot-seed1-919d38e9"
    )


def test_knobs_follow_the_declarations_in_sweeps():
    configs = expand_sweep({"method": ["coop", "kgcoop", "prograd", "kd"], "lambda": [1.0, 0.5], "alpha": [1, 2]},
                           {"dataset": "OxfordPets", "shots": 4})  # fmt: skip
    counts = {m: sum(c.method == m for c in configs) for m in ("coop", "kgcoop", "prograd", "kd")}
    assert counts == {"coop": 1, "kgcoop": 1, "prograd": 2, "kd": 2}


def test_a_trained_teacher_only_goes_with_a_kl_method():
    with pytest.raises(ConfigError, match="KL target"):
        resolve(RunConfig(method="coop", dataset="OxfordPets", shots=4, teacher="somewhere"))


# ------------------------------------------------------------------------------------------------------ KgCoOp
def _plain_kgcoop(clip, features, labels, anchors, steps, epochs):
    """KgCoOp's release written plainly: 77-token path, CE + 8 * (1 - mean_k cos(t_k, t0_k)), torch.optim.SGD with
    the warm-up epoch and the per-epoch cosine rate."""
    model = clip.model
    prompts = [f"a photo of a {name}." for name in NAMES]
    tokens = clip.tokenizer(prompts)
    with torch.no_grad():
        embedded = model.token_embedding(tokens)
    ctx = torch.nn.Parameter(embedded[0, 1:5].clone())
    optimizer = torch.optim.SGD([ctx], lr=1e-5, momentum=0.9, weight_decay=5e-4)
    images = F.normalize(features[:, 0], dim=-1)
    scale = model.logit_scale.exp()
    for epoch in range(steps):  # one iteration per epoch (N < batch)
        for group in optimizer.param_groups:
            group["lr"] = 1e-5 if epoch == 0 else 0.001 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        x = torch.cat([embedded[:, :1], ctx.expand(len(NAMES), -1, -1), embedded[:, 5:]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        text = model.ln_final(x)[torch.arange(len(NAMES)), tokens.argmax(dim=-1)] @ model.text_projection
        logits = scale * images @ F.normalize(text, dim=-1).T
        score = torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, anchors)
        loss = F.cross_entropy(logits, labels) + 8.0 * (1.0 - score.mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ctx.detach()


def test_kgcoop_steps_equal_its_loss_written_plainly(tiny):
    torch.manual_seed(1)
    features, labels = torch.randn(10, 1, 64), torch.arange(10) % len(NAMES)
    anchors = zero_shot_weights(tiny, NAMES, "a photo of a {}, a type of pet.")
    config = resolve(RunConfig(method="kgcoop", dataset="OxfordPets", shots=2, epochs=12))
    encoder = PromptEncoder(tiny, NAMES, n_ctx=4, prompt_prefix="a photo of a")
    schedule = Schedule(10, config.batch_size, config.epochs, config.lr, config.warmup_lr)
    run = RunState(config, torch.arange(10), labels, schedule, torch.Generator().manual_seed(1), None, "kgcoop")
    start = encoder.initial_context("template")[None]
    engine = LockstepEngine(encoder, features, [run], start, {"kgcoop": anchors}, tiny.logit_scale,
                            update_fn=prograd_update_ref)  # fmt: skip
    for _ in range(8):
        engine.step()
    expected = _plain_kgcoop(tiny, features, labels, anchors, 8, 12)
    assert_close(engine.context(0), expected, what="KgCoOp context after 8 steps")
    without = _plain_kgcoop_without_distance_differs(tiny, features, labels, expected)
    assert without, "the text-distance term should change the trajectory (else this test checks only CoOp)"


def _plain_kgcoop_without_distance_differs(clip, features, labels, expected) -> bool:
    far = zero_shot_weights(clip, NAMES, "{}")  # another anchor: another trajectory
    return not torch.allclose(_plain_kgcoop(clip, features, labels, far, 8, 12), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ angles
def _engine(clip, method, features, labels, teacher, **fields):
    config = resolve(RunConfig(method=method, dataset="OxfordPets", shots=2, epochs=10, init="template", **fields))
    encoder = PromptEncoder(clip, NAMES, n_ctx=16, prompt_prefix="a photo of a")
    schedule = Schedule(len(labels), config.batch_size, config.epochs, config.lr, config.warmup_lr)
    key = "zs" if config.uses_teacher else None
    run = RunState(config, torch.arange(len(labels)), labels, schedule, torch.Generator().manual_seed(1), key)
    start = encoder.initial_context("template")[None]
    engine = LockstepEngine(encoder, features, [run], start, {"zs": teacher}, clip.logit_scale,
                            update_fn=prograd_update_ref)  # fmt: skip
    return engine, encoder, run


def _plain_angle(encoder, context, clip, features, labels, teacher) -> float:
    """cos(G_d, G_g) of one step, from two backward passes of the plain loss (teacher at temperature 1)."""
    ctx = context.clone().requires_grad_(True)
    images = F.normalize(features[:, 0], dim=-1)
    text = encoder.reference(ctx[None])[0]
    logits = clip.logit_scale * images @ F.normalize(text, dim=-1).T
    (g_d,) = torch.autograd.grad(F.cross_entropy(logits, labels), ctx, retain_graph=True)
    target = (clip.logit_scale * images @ teacher.T).softmax(dim=-1)
    (g_g,) = torch.autograd.grad(-(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean(), ctx)
    return float((g_d * g_g).sum() / (g_d.norm() * g_g.norm()))


@pytest.mark.parametrize("method", ["coop", "kd"])
def test_angles_are_logged_without_changing_the_update(tiny, method):
    torch.manual_seed(2)
    features, labels = torch.randn(10, 1, 64), torch.arange(10) % len(NAMES)
    teacher = zero_shot_weights(tiny, NAMES, "a photo of a {}.")
    logged, encoder, run = _engine(tiny, method, features, labels, teacher, angles=True)
    plain, _, plain_run = _engine(tiny, method, features, labels, teacher)
    assert run.teacher == "zs"
    expected = _plain_angle(encoder, logged.context(0), tiny, features, labels, teacher)
    logged.step()
    plain.step()
    logged.collect(0)
    assert run.totals["cos"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert_close(logged.context(0), plain.context(0), what=f"{method} with and without angles")
    if method == "kd":  # KD's update mixes the gradients; the angle is the one before mixing
        assert abs(run.totals["cos"] - expected) < 1e-4 and plain_run.config.alpha_used == 1.0


# ----------------------------------------------------------------------------------------------- sweep features
def test_without_augmentation_training_reads_the_centre_view(tiny, tmp_path):
    cache = CenterCache()
    config = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=2, epochs=3, augment=False))
    assert "noaug" in config.run_id
    options = SweepOptions(progress=False, update_fn=prograd_update_ref)
    records = run_sweep(cache, tiny, [config], tmp_path / "noaug", options)
    centred = CenterCache()
    train = centred._splits["train"]
    train.features = train.center[:, None].clone()  # the only view: the centre crop
    same = dataclasses.replace(config, augment=True)
    expected = run_sweep(centred, tiny, [same], tmp_path / "views", options)
    ctx = load_file(tmp_path / "noaug" / records[0]["run_id"] / "prompt.safetensors")["ctx"]
    ref = load_file(tmp_path / "views" / expected[0]["run_id"] / "prompt.safetensors")["ctx"]
    assert_close(ctx, ref, what="centre-view training vs a cache of centre views")
    augmented = run_sweep(cache, tiny, [same], tmp_path / "aug", options)
    other = load_file(tmp_path / "aug" / augmented[0]["run_id"] / "prompt.safetensors")["ctx"]
    assert not torch.allclose(other, ctx), "the augmented views should give another context"


def test_every_run_keeps_its_test_predictions(tiny, tmp_path):
    cache = CenterCache()
    configs = expand_sweep({"method": ["zeroshot", "coop", "prograd"]}, {"dataset": "OxfordPets", "shots": 2,
                                                                         "epochs": 2})  # fmt: skip
    records = run_sweep(cache, tiny, configs, tmp_path, SweepOptions(progress=False))
    labels = cache.split("test").labels.numpy()
    for record in records:
        stored = np.load(tmp_path / record["run_id"] / "predictions.npz")
        assert stored["predictions"].dtype == np.int16 and np.array_equal(stored["labels"], labels)
        assert 100.0 * float((stored["predictions"] == labels).mean()) == pytest.approx(record["accuracy"])


def test_base_to_new_keeps_new_class_predictions(tiny, tmp_path):
    cache = CenterCache()
    configs = expand_sweep({"method": ["zeroshot", "coop"]}, {"dataset": "OxfordPets", "shots": 2, "epochs": 2,
                                                              "setting": "base2new"})  # fmt: skip
    records = run_sweep(cache, tiny, configs, tmp_path, SweepOptions(progress=False))
    for record in records:
        stored = np.load(tmp_path / record["run_id"] / "predictions.npz")
        hits = stored["new_predictions"] == stored["new_labels"]
        assert 100.0 * float(hits.mean()) == pytest.approx(record["new_accuracy"])


# ------------------------------------------------------------------------------------------ trained teacher
def test_a_trained_prompt_is_the_teacher(tiny, tmp_path, monkeypatch):
    cache = CenterCache()
    options = SweepOptions(progress=False, update_fn=prograd_update_ref)
    coop = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=4, epochs=2))
    [teacher_record] = run_sweep(cache, tiny, [coop], tmp_path / "teacher", options)
    folder = tmp_path / "teacher" / teacher_record["run_id"]
    ctx = load_file(folder / "prompt.safetensors")["ctx"]
    expected = F.normalize(PromptEncoder(tiny, NAMES, n_ctx=16)(ctx[None])[0], dim=-1)
    seen = {}
    original = LockstepEngine.__init__

    def spy(self, encoder, features, runs, contexts, teachers, *args, **kwargs):
        seen.update(teachers)
        original(self, encoder, features, runs, contexts, teachers, *args, **kwargs)

    monkeypatch.setattr(LockstepEngine, "__init__", spy)
    prograd = resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=4, epochs=2, teacher=str(folder)))
    [record] = run_sweep(cache, tiny, [prograd], tmp_path / "student", options)
    assert record["status"] == "done" and "trainedteacher" in record["run_id"]
    assert_close(seen[f"trained:{folder}"], expected, what="the trained teacher's class weights")
    result = json.loads((tmp_path / "student" / record["run_id"] / "result.json").read_text())
    assert result["config"]["teacher"] == str(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        ("n_ctx", "context vectors"),
        ("model", "trained on"),
        ("classes", "other classes"),
        ("shape", "shape"),
        ("missing", "not a run folder"),
    ],
)
def test_a_wrong_teacher_is_refused_before_training(tiny, tmp_path, change, message):
    cache = CenterCache()
    options = SweepOptions(progress=False)
    coop = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=4, epochs=1))
    [teacher_record] = run_sweep(cache, tiny, [coop], tmp_path / "teacher", options)
    folder = tmp_path / "teacher" / teacher_record["run_id"]
    result = json.loads((folder / "result.json").read_text())
    n_ctx = 16
    if change == "n_ctx":
        n_ctx = 8
    elif change == "model":
        result["cache"]["model"] = "RN50"
    elif change == "classes":
        result["classes"] = ["cat", "dog"]
    elif change == "shape":
        from safetensors.torch import save_file

        save_file({"ctx": torch.zeros(16, 32)}, str(folder / "prompt.safetensors"))
    elif change == "missing":
        (folder / "result.json").unlink()
    if change != "missing":
        (folder / "result.json").write_text(json.dumps(result))
    configs = expand_sweep(
        {"method": ["zeroshot", "prograd"]},
        {"dataset": "OxfordPets", "shots": 4, "epochs": 1, "teacher": str(folder), "n_ctx": n_ctx},
    )
    out = tmp_path / "student"
    with pytest.raises(FastPromptError, match=message):
        run_sweep(cache, tiny, configs, out, options)
    assert not [p for p in out.glob("*") if p.is_dir()], "nothing may be trained with a wrong teacher"


# -------------------------------------------------------------------------------------------- whole split
def test_shots_zero_trains_on_the_whole_training_split(tiny, tmp_path):
    options = SweepOptions(progress=False)
    config = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=0, epochs=1, batch_size=8))
    assert config.epochs == 1 and "fulltrain" in config.run_id
    with pytest.raises(FastPromptError, match="--full-train"):
        run_sweep(CenterCache(), tiny, [config], tmp_path / "fewshot", options)
    cache = CenterCache(full_train=True)
    [record] = run_sweep(cache, tiny, [config], tmp_path / "full", options)
    result = json.loads((tmp_path / "full" / record["run_id"] / "result.json").read_text())
    assert len(result["fewshot"]["train_keys"]) == len(cache.split("train").keys)
    assert result["timings"]["steps"] == len(cache.split("train").keys) // 8


# ------------------------------------------------------------------------------- heads and CoCoOp in the sweep
def test_heads_run_in_the_sweep_as_their_fit_alone(tiny, tmp_path):
    from fastprompt.heads import HEADS
    from fastprompt.train.heads import head_task
    from fastprompt.train.view import DatasetView, _templates

    cache = CenterCache()
    configs = expand_sweep({"method": ["tip_adapter", "gda", "cosine+prograd", "clap"]},
                           {"dataset": "OxfordPets", "shots": 4, "epochs": 3})  # fmt: skip
    records = run_sweep(cache, tiny, configs, tmp_path, SweepOptions(progress=False))
    assert [r["status"] for r in records] == ["done"] * 4
    view = DatasetView(cache, tiny, "fewshot")
    by_id = {r["run_id"]: r for r in records}
    for config in configs:
        record = by_id[config.run_id]
        alone = HEADS[config.method].fit(head_task(config, view, tiny, _templates(cache)[0]))
        assert record["accuracy"] == pytest.approx(alone.accuracy)
        stored = np.load(tmp_path / record["run_id"] / "predictions.npz")
        assert np.array_equal(stored["predictions"], alone.predictions.numpy())
        if config.declaration.trained:
            assert (tmp_path / record["run_id"] / "prompt.safetensors").is_file()


def test_a_head_that_cannot_run_fails_alone(tiny, tmp_path):
    cache = CenterCache()
    cache._splits["val"] = Split(torch.zeros(0, 1, 64), torch.zeros(0, dtype=torch.long), [], torch.zeros(0, 64))
    original = cache.fewshot

    def no_validation(shots, seed):
        subset = original(shots, seed)
        return Subset(subset.train_index, torch.zeros(0, dtype=torch.long), subset.train_keys, [])

    cache.fewshot = no_validation
    configs = expand_sweep({"method": ["zeroshot", "tip_adapter", "coop"]},
                           {"dataset": "OxfordPets", "shots": 2, "epochs": 1})  # fmt: skip
    records = {r["method"]: r for r in run_sweep(cache, tiny, configs, tmp_path, SweepOptions(progress=False))}
    assert records["zeroshot"]["status"] == records["coop"]["status"] == "done"
    assert records["tip_adapter"]["status"] == "failed"
    reason = json.loads((tmp_path / records["tip_adapter"]["run_id"] / "result.json").read_text())["reason"]
    assert "validation" in reason and "\n" not in reason


def test_cocoop_runs_batched_in_the_sweep_equal_runs_alone(tiny, tmp_path):
    cache = CenterCache()
    configs = expand_sweep({"method": ["cocoop", "prograd_cocoop"], "seed": [1, 2]},
                           {"dataset": "OxfordPets", "shots": 1, "epochs": 2, "batch_size": 2})  # fmt: skip
    options = SweepOptions(progress=False, update_fn=prograd_update_ref)
    together = run_sweep(cache, tiny, configs, tmp_path / "together", options)
    assert [r["status"] for r in together] == ["done"] * 4
    for config in configs:
        [alone] = run_sweep(cache, tiny, [config], tmp_path / "alone" / config.run_id, options)
        joint = load_file(tmp_path / "together" / config.run_id / "prompt.safetensors")
        single = load_file(tmp_path / "alone" / config.run_id / config.run_id / "prompt.safetensors")
        assert set(joint) == set(METHODS[config.method].trainable)
        for name in joint:
            assert_close(joint[name], single[name], what=f"{config.run_id} {name}")
        assert alone["accuracy"] == pytest.approx(next(r["accuracy"] for r in together if r["run_id"] == config.run_id))


def test_cocoop_is_scored_on_transfer_targets(tiny, tmp_path):
    """The same test split under another name, and with its classes in another order: the transfer accuracy of a
    CoCoOp run (context, meta-net, a context per image) equals its in-domain accuracy."""
    source = CenterCache(seed=4)
    same = CenterCache(seed=4)
    same.dataset = "PetsCopy"
    shuffled = CenterCache(seed=4)
    shuffled.dataset = "PetsShuffled"
    order = [3, 0, 4, 1, 2]
    shuffled.classnames = [NAMES[i] for i in order]
    test = shuffled.split("test")
    test.labels = torch.tensor([order.index(int(label)) for label in test.labels])
    configs = expand_sweep({"method": ["cocoop", "prograd_cocoop"]},
                           {"dataset": "OxfordPets", "epochs": 1, "shots": 1, "batch_size": 2})  # fmt: skip
    records = run_sweep(source, tiny, configs, tmp_path, SweepOptions(progress=False, targets=[same, shuffled]))
    for record in records:
        assert record["targets"]["PetsCopy"] == pytest.approx(record["accuracy"])
        assert record["targets"]["PetsShuffled"] == pytest.approx(record["accuracy"])


def test_a_head_that_needs_views_fails_alone_on_a_one_view_cache(tiny, tmp_path):
    cache = CenterCache(views=1)
    configs = expand_sweep({"method": ["tip_adapter", "gda", "linear_sgd"]},
                           {"dataset": "OxfordPets", "shots": 2, "epochs": 1})  # fmt: skip
    records = {r["method"]: r for r in run_sweep(cache, tiny, configs, tmp_path, SweepOptions(progress=False))}
    assert records["tip_adapter"]["status"] == records["gda"]["status"] == "failed"
    reason = json.loads((tmp_path / records["gda"]["run_id"] / "result.json").read_text())["reason"]
    assert "augmented views" in reason and "--views" in reason
    assert records["linear_sgd"]["status"] == "done"


def test_list_methods_prints_every_declaration():
    from fastprompt.cli.app import app, load_commands
    from typer.testing import CliRunner

    load_commands()
    listed = CliRunner().invoke(app, ["train", "--list-methods"])
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.output.splitlines() if line.strip()]
    assert names == list(METHODS)
    missing = CliRunner().invoke(app, ["train", "--methods", "coop"])
    assert missing.exit_code == 2 and "--cache" in missing.output and "Traceback" not in missing.output
