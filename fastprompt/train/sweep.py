"""A sweep: every run of a cache, prompt runs grouped and trained in lock-step, baselines computed directly.

`run_sweep` skips runs that finished (their result.json exists), resumes the others from their last checkpoint
(every `checkpoint_minutes`), writes each run's folder atomically and appends it once to `results.jsonl`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastprompt.cache.network import load_cache_clip
from fastprompt.errors import FastPromptError
from fastprompt.kernels.prograd_update import prograd_update
from fastprompt.locks import FolderLock
from fastprompt.prompt import random_context
from fastprompt.templates import ensemble_templates, template_prefix
from fastprompt.train.baselines import _baseline
from fastprompt.train.config import RunConfig, Schedule
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.results import ResultWriter, run_record
from fastprompt.train.transfer import TransferTargets
from fastprompt.train.view import DatasetView, _templates
from fastprompt.zeroshot import accuracy, zero_shot_weights

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SweepOptions:
    """How a sweep runs (not what it computes: that is in the RunConfigs)."""

    device: str = "cpu"
    class_chunk: int | str | None = None  # classes per chunk of the encoder pass; "auto": fit free memory (memory.py)
    checkpoint_minutes: float = 10.0  # 0: checkpoint after every step
    progress: bool = True
    max_group: int = 64  # runs trained together at most (memory)
    update_fn: Callable = prograd_update
    stop_after_steps: int | None = None  # testing aid: return after this many engine steps (simulates a kill)
    targets: list = field(default_factory=list)  # FeatureCaches to evaluate every trained context on (transfer)


def _evaluate(encoder, context: torch.Tensor, test) -> tuple[float, list, torch.Tensor | None]:
    """(accuracy %, per-class accuracies, predictions) of a shared context on (features, labels)."""
    if test is None:
        return float("nan"), [], None
    features, labels = test
    with torch.no_grad():
        weights = F.normalize(encoder(context[None].to(encoder.device))[0].float(), dim=-1)
    predictions = (features.to(weights.device) @ weights.T).argmax(dim=-1)
    return (*accuracy(predictions, labels, encoder.num_classes), predictions)


def run_sweep(cache, clip, configs: list[RunConfig], out_dir: Path, options: SweepOptions | None = None) -> list[dict]:
    """Train and evaluate every run of `configs` on `cache`; returns the result records (also in results.jsonl).

    Args:
        cache: a loaded FeatureCache.
        clip: the Clip the cache was made with (the teacher and the text tower).
        configs: resolved RunConfigs of `cache.dataset`.
        out_dir: the sweep folder.
        options: device, chunking, checkpointing, progress.

    Under torchrun (or in a process group already started) each rank trains its share of the runs and every rank
    returns all records (fastprompt/train/distributed.py).

    Raises:
        FolderInUseError: another process is running a sweep in `out_dir` (one writer per folder: fastprompt/locks.py).
        FastPromptError: torchrun ranks that disagree on the runs, the cache or the folder.
    """
    from fastprompt.train.distributed import sweep_on_ranks, sweep_ranks

    options = options or SweepOptions()
    ranks = sweep_ranks(options.device)
    if ranks.world_size > 1:
        return sweep_on_ranks(cache, clip, configs, Path(out_dir), options, ranks, _sweep)
    with FolderLock(out_dir, "fastprompt train", remedy="pass another --out"):
        return _sweep(cache, clip, configs, Path(out_dir), options)


def _sweep(cache, clip, configs: list[RunConfig], out_dir: Path, options: SweepOptions) -> list[dict]:
    """`run_sweep` with the sweep folder locked."""
    writer = ResultWriter(Path(out_dir))
    for config in configs:
        if config.dataset != cache.dataset:
            raise FastPromptError(f"Run {config.run_id} is for {config.dataset} but the cache holds {cache.dataset}.")
    pending = [c for c in configs if not writer.finished(c.run_id)]
    targets = TransferTargets(options.targets, cache, clip)
    targets.check(pending)  # a target layout the context cannot fill fails now, not after training
    views = {setting: DatasetView(cache, clip, setting) for setting in {c.setting for c in pending}}
    prograd_tpl, coop_tpl = _templates(cache)
    for config in {c.teacher: c for c in pending if c.teacher}.values():  # a wrong teacher: refused before training
        from fastprompt.train.teacher import trained_teacher_weights

        trained_teacher_weights(config.teacher, clip, cache, views[config.setting], config.n_ctx)
    for config in [c for c in pending if c.declaration.kind in ("zeroshot", "probe")]:
        metrics, timings, train_keys, val_keys, predictions = _baseline(
            config, views[config.setting], clip, prograd_tpl, coop_tpl
        )
        if targets and config.declaration.kind == "zeroshot":
            metrics["targets"] = targets.zero_shot_accuracies(config.declaration.templates == "ensemble")
        writer.write(config, cache, metrics, timings, train_keys, val_keys, predictions=predictions,
                     classes=views[config.setting].base_names)  # fmt: skip
    for config in [c for c in pending if c.declaration.kind == "head"]:
        from fastprompt.train.heads import run_head

        run_head(config, views[config.setting], clip, prograd_tpl, writer)
    groups: dict[tuple, list[RunConfig]] = defaultdict(list)
    for config in [c for c in configs if c.declaration.kind in ("prompt", "cocoop")]:  # finished runs too: a
        # rerun's groups are the first run's
        prefix = _prompt_prefix(config, prograd_tpl)
        key = (config.declaration.kind, config.setting, prefix, config.n_ctx, config.position, config.class_specific,
               config.precision, config.augment)  # fmt: skip
        groups[key].append(config)
    # On a CPU a group of more than about 15 runs costs more per run-step, not less: its activations outgrow glibc's
    # largest mmap threshold (32 MiB) and come back as fresh pages every step (bench/results/train_step.csv: OxfordPets
    # P = 45 1.26x P = 15's time per run-step, as three groups of 15 1.03x).
    size = min(options.max_group, 15) if str(options.device) == "cpu" else options.max_group
    chunks = [
        (key, [c for c in members[start : start + size] if not writer.finished(c.run_id)])
        for key, members in groups.items()
        for start in range(0, len(members), size)
    ]
    chunks = [(key, chunk) for key, chunk in chunks if chunk]
    total = sum(_total_steps(c, views[c.setting]) for _, chunk in chunks for c in chunk)
    progress = _progress(total, options.progress)
    for (kind, setting, prefix, *_), chunk in chunks:
        done = _train_group(
            kind,
            chunk,
            views[setting],
            clip,
            prefix,
            (prograd_tpl, coop_tpl),
            writer,
            options,
            progress,
            cache,
            targets,
        )
        if not done:
            progress.close()
            return writer.records()
    progress.close()
    return writer.records()


def _prompt_prefix(config: RunConfig, prograd_tpl: str) -> str | None:
    """The template words a "template"-initialised context starts from: the method's own (KgCoOp's "a photo of a")
    or the dataset's ProGrad template; None for a random context."""
    if config.init != "template":
        return None
    if config.declaration.kind == "cocoop":  # the release's rule: its words when they fit in n_ctx, else CoOp's
        from fastprompt.train.cocoop import init_prefix

        return init_prefix(prograd_tpl, config.n_ctx)[0]
    return config.declaration.prompt_prefix or template_prefix(prograd_tpl)


def _total_steps(config: RunConfig, view: DatasetView) -> int:
    rows, _, _, _ = view.subset(config.shots, config.seed)
    return Schedule(rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr).total_steps


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="training", dynamic_ncols=True)


def _train_group(kind, configs, view, clip, prefix, templates, writer, options, progress, cache, targets) -> bool:
    """Train one group of runs that share an encoder layout: prompt runs in a LockstepEngine, CoCoOp runs in a
    CocoopEngine (the same interface). Returns False when stopped early (`stop_after_steps`)."""
    from fastprompt.encoder import PromptEncoder

    prograd_tpl, coop_tpl = templates
    first = configs[0]
    layout = {"n_ctx": first.n_ctx, "position": first.position, "prompt_prefix": prefix}
    encoder = PromptEncoder(clip, view.base_names, class_specific=first.class_specific, **layout)
    new_encoder = PromptEncoder(clip, view.new_names, class_specific=False, **layout) if view.new_names else None
    teachers = _teachers(configs, view, clip, prograd_tpl, coop_tpl, cache)
    runs, contexts, keys = [], [], {}
    for config in configs:
        rows, labels, train_keys, val_keys = view.subset(config.shots, config.seed)
        keys[config.run_id] = (train_keys, val_keys)
        schedule = Schedule(
            rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr, config.warmup_epochs
        )
        generator = torch.Generator().manual_seed(config.seed)
        anchor = "kgcoop" if config.declaration.text_distance else None
        runs.append(RunState(config, rows, labels, schedule, generator, _teacher_key(config), anchor))
        if kind == "prompt":
            contexts.append(_initial_context(encoder, config))
    features = view.train.features if first.augment else view.train_center()  # (N, V, D) or the centre view (N, 1, D)
    common = dict(
        class_chunk=options.class_chunk, update_fn=options.update_fn, autocast_dtype=AUTOCAST[first.precision]
    )
    if kind == "cocoop":
        from fastprompt.train.cocoop import CocoopEngine

        engine = CocoopEngine(encoder, features, runs, teachers, clip.logit_scale, template=prograd_tpl, **common)
    else:
        engine = LockstepEngine(encoder, features, runs, torch.stack(contexts), teachers, clip.logit_scale, **common)
    _restore(engine, writer, progress)
    last_checkpoint, steps, finished = time.monotonic(), 0, 0
    started = time.monotonic()
    ending = _ended(engine, writer)  # runs restored at their end: checkpointed, killed before they were written
    stopping = False
    while True:
        for index in ending:
            group = (started, len(configs))
            _finish(engine, index, encoder, new_encoder, view, writer, keys, group, cache, targets)
            finished += 1
            progress.set_postfix_str(f"runs {finished}/{len(configs)} done")
        if not engine.active:
            return True
        if stopping:
            return False
        stepped = engine.step()
        progress.update(len(stepped))
        steps += 1
        for index in stepped:
            run = engine.runs[index]
            if run.step % run.schedule.iterations == 0 and engine.collect(index):
                _close_epoch(engine, index, encoder, view)
        ending = _ended(engine, writer)
        stopping = options.stop_after_steps is not None and steps >= options.stop_after_steps
        if ending or stopping or time.monotonic() - last_checkpoint >= options.checkpoint_minutes * 60:
            # Before any run of this step is written (docs/reliability.md): a rerun resumes the group here as one.
            _checkpoint(engine, writer)
            last_checkpoint = time.monotonic()


def _teacher_key(config: RunConfig) -> str | None:
    """The key of a run's KL target in the group's teachers (None: no KL term)."""
    if not config.uses_teacher:
        return None
    if config.teacher:
        return f"trained:{config.teacher}"
    return config.declaration.teacher or "single"  # "single" also for runs that only log angles


def _teachers(configs, view, clip, prograd_tpl: str, coop_tpl: str, cache) -> dict[str, torch.Tensor]:
    """The normalised class weights (K, E) the group's runs need: zero-shot heads by key, trained-prompt teachers
    ("trained:<path>", Figure 7's upper bound) and KgCoOp's hand-crafted class text features ("kgcoop")."""
    keys = {_teacher_key(c) for c in configs} - {None}
    teachers = {}
    if "single" in keys:
        teachers["single"] = zero_shot_weights(clip, view.base_names, prograd_tpl)
    if "ensemble" in keys:
        teachers["ensemble"] = zero_shot_weights(clip, view.base_names, ensemble_templates(cache.dataset))
    if any(c.declaration.text_distance for c in configs):  # KgCoOp's release: the dataset's CoOp template
        teachers["kgcoop"] = zero_shot_weights(clip, view.base_names, coop_tpl)
    for key in sorted(k for k in keys if k.startswith("trained:")):
        from fastprompt.train.teacher import trained_teacher_weights

        teachers[key] = trained_teacher_weights(key.removeprefix("trained:"), clip, cache, view, configs[0].n_ctx)
    return teachers


def _evaluate_run(engine, index: int, encoder, test) -> tuple[float, list, torch.Tensor | None]:
    """(accuracy, per-class accuracies, predictions) of run `index` on `test` with `encoder`'s classes."""
    if test is None:
        return float("nan"), [], None
    if hasattr(engine, "evaluate"):  # CoCoOp: a context per test image
        return engine.evaluate(index, test[0], test[1], encoder=encoder)
    return _evaluate(encoder, engine.context(index), test)


def _initial_context(encoder, config: RunConfig) -> torch.Tensor:
    if config.init == "template":
        return encoder.initial_context("template")
    generator = torch.Generator().manual_seed(config.seed)
    if config.class_specific:
        rows = [random_context(config.n_ctx, encoder.width, generator) for _ in range(encoder.num_classes)]
        return torch.stack(rows).to(encoder.device)
    return random_context(config.n_ctx, encoder.width, generator).to(encoder.device)


def _close_epoch(engine, index: int, encoder, view: DatasetView) -> None:
    run = engine.runs[index]
    totals, epoch = run.totals, run.epoch
    steps = max(totals.get("steps", 1.0), 1.0)
    record = {
        "epoch": epoch,
        "lr": totals.get("lr"),
        "loss": totals.get("loss", 0.0) / steps,
        "train_accuracy": 100.0 * totals.get("correct", 0.0) / max(totals.get("seen", 1.0), 1.0),
    }
    if run.teacher is not None:  # the angle of G_d and G_g: ProGrad's, KD's before mixing, CoOp's with --angles
        record["cos_mean"] = totals.get("cos", 0.0) / steps
        record["conflict_fraction"] = totals.get("conflicts", 0.0) / steps
    every = run.config.eval_every
    if every and (epoch % every == 0 or run.done):
        record["test_accuracy"] = _evaluate_run(engine, index, encoder, view.test_base)[0]
    run.log.append(record)
    run.totals = {}


def _finish(engine, index, encoder, new_encoder, view, writer, keys, group, cache, targets) -> None:
    run = engine.runs[index]
    metrics: dict = {}
    predictions: dict = {}
    if run.status != "failed":
        base_acc, per_class, base_predictions = _evaluate_run(engine, index, encoder, view.test_base)
        metrics = {"accuracy": base_acc, "per_class_accuracy": per_class}
        if base_predictions is not None:
            predictions = {"predictions": base_predictions, "labels": view.test_base[1]}
        if new_encoder is not None:
            new_acc, _, new_predictions = _evaluate_run(engine, index, new_encoder, view.test_new)
            harmonic = 2 * base_acc * new_acc / (base_acc + new_acc) if base_acc + new_acc > 0 else 0.0
            metrics.update(base_accuracy=base_acc, new_accuracy=new_acc, harmonic_mean=harmonic)
            if new_predictions is not None:
                predictions.update(new_predictions=new_predictions, new_labels=view.test_new[1])
        if hasattr(engine, "metrics"):  # what the engine knows of a run (CoCoOp: whether its init fell back)
            metrics.update(engine.metrics(index))
        if targets and run.config.uses_prompt and not run.config.class_specific:  # in each target's prompt layout
            metrics["targets"] = targets.prompt_accuracies(engine.context(index), run.config)
        elif targets and run.config.declaration.kind == "cocoop":
            metrics["targets"] = targets.cocoop_accuracies(engine, index, run.config, encoder.prompt_prefix)
    started, group_runs = group
    timings = {"train_seconds": time.monotonic() - started, "steps": run.step, "group_runs": group_runs}
    train_keys, val_keys = keys[run.config.run_id]
    tensors = engine.trained_tensors(index) if hasattr(engine, "trained_tensors") else {"ctx": engine.context(index)}
    writer.write(
        run.config,
        cache,
        metrics,
        timings,
        train_keys,
        val_keys,
        log=run.log,
        status=run.status if run.status == "failed" else "done",
        reason=run.reason,
        divergence=run.divergence,
        tensors=tensors,
        predictions=predictions,
        classes=view.base_names,
    )


def _ended(engine: LockstepEngine, writer: ResultWriter) -> list[int]:
    """The runs that finished or failed and are not written yet."""
    return [
        index
        for index, run in enumerate(engine.runs)
        if (run.done or run.status == "failed") and not writer.finished(run.config.run_id)
    ]


def _checkpoint(engine: LockstepEngine, writer: ResultWriter) -> None:
    """Checkpoint every run of the group not yet written (ended ones too), all at the same step.

    Nothing is collected here: the sums not yet logged travel in the checkpoint as they are, so when checkpoints
    happen never changes a logged loss or when a divergence is found.
    """
    group = [run.config.run_id for run in engine.runs]
    for index, run in enumerate(engine.runs):
        if not writer.finished(run.config.run_id):
            writer.save_checkpoint(
                run.config.run_id, {"run": run.state_dict(), "group": group, **engine.checkpoint(index)}
            )


def _restore(engine: LockstepEngine, writer: ResultWriter, progress) -> None:
    """Resume every run of the group at the last step at which all of them were checkpointed.

    A kill in the middle of a checkpoint leaves some runs at the new step and the others at the one before, which
    every run keeps (checkpoint.prev.pt). Resuming all at one step keeps the group's composition at every later step
    what it was in an uninterrupted sweep, and with it every result bit for bit. A group that changed since (a run
    added to the sweep) resumes each run from its newest checkpoint: the same results up to float rounding.
    """
    ids = [run.config.run_id for run in engine.runs]
    saved = [writer.load_checkpoints(run_id) for run_id in ids]  # {file name: state}
    names = [{state["run"]["step"]: name for name, state in files.items()} for files in saved]  # {step: file name}
    common = min(max(steps, default=0) for steps in names)
    same_group = all(set(ids) <= set(state.get("group", ())) for files in saved for state in files.values())
    for index, (run, files, steps) in enumerate(zip(engine.runs, saved, names, strict=True)):
        if same_group:
            name = steps.get(common)  # None where not all were checkpointed yet: start afresh
            writer.keep_checkpoint(run.config.run_id, name)
        else:
            name = steps[max(steps)] if steps else None
        if name is not None:
            run.load_state_dict(files[name]["run"])
            engine.restore(index, files[name])
            progress.update(run.step)


__all__ = ["SweepOptions", "load_cache_clip", "run_sweep", "run_record"]  # load_cache_clip: its old home
