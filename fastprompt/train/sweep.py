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
from fastprompt.train.config import RunConfig, Schedule
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.results import ResultWriter, run_record
from fastprompt.train.transfer import TransferTargets
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


class DatasetView:
    """The classes, features and subsets a run sees in its setting (few-shot: all classes; base2new: base ones)."""

    def __init__(self, cache, clip, setting: str) -> None:
        from fastprompt.data.fewshot import split_base_new

        self.cache, self.clip, self.setting = cache, clip, setting
        names = cache.classnames
        all_labels = list(range(len(names)))
        self.base, self.new = split_base_new(len(names)) if setting == "base2new" else (all_labels, [])
        self.base_names = [names[i] for i in self.base]
        self.new_names = [names[i] for i in self.new]
        self.train = cache.split("train")
        test = cache.split("test")
        self.test_base = _select(test.features[:, 0], test.labels, self.base)
        self.test_new = _select(test.features[:, 0], test.labels, self.new) if self.new else None

    def subset(self, shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Training rows and their labels in the setting's class space, plus the subset's keys."""
        subset = self.cache.fewshot(shots, seed)
        labels = self.train.labels[subset.train_index]
        mapping = torch.full((len(self.cache.classnames),), -1, dtype=torch.long, device=labels.device)
        mapping[torch.tensor(self.base, device=labels.device)] = torch.arange(len(self.base), device=labels.device)
        relabelled = mapping[labels]
        keep = relabelled >= 0
        return subset.train_index[keep].cpu(), relabelled[keep].cpu(), subset.train_keys, subset.val_keys


def _select(features: torch.Tensor, labels: torch.Tensor, classes: list[int], normalize: bool = True):
    if not classes:
        return None
    mapping = torch.full((int(labels.max()) + 1 if labels.numel() else 1,), -1, dtype=torch.long, device=labels.device)
    chosen = torch.tensor([c for c in classes if c < mapping.numel()], dtype=torch.long, device=labels.device)
    mapping[chosen] = torch.arange(chosen.numel(), device=labels.device)
    relabelled = mapping[labels]
    keep = relabelled >= 0
    chosen_features = features[keep].float()
    return (F.normalize(chosen_features, dim=-1) if normalize else chosen_features), relabelled[keep]


def _evaluate(encoder, context: torch.Tensor, test) -> tuple[float, list]:
    if test is None:
        return float("nan"), []
    features, labels = test
    with torch.no_grad():
        weights = F.normalize(encoder(context[None].to(encoder.device))[0].float(), dim=-1)
    predictions = (features.to(weights.device) @ weights.T).argmax(dim=-1)
    return accuracy(predictions, labels, encoder.num_classes)


def _templates(cache) -> tuple[str, str]:
    templates = cache.manifest.get("templates") or {}
    from fastprompt.templates import coop_template, prograd_template

    return templates.get("prograd") or prograd_template(cache.dataset), templates.get("coop") or coop_template(
        cache.dataset
    )


def run_sweep(cache, clip, configs: list[RunConfig], out_dir: Path, options: SweepOptions | None = None) -> list[dict]:
    """Train and evaluate every run of `configs` on `cache`; returns the result records (also in results.jsonl).

    Args:
        cache: a loaded FeatureCache.
        clip: the Clip the cache was made with (the teacher and the text tower).
        configs: resolved RunConfigs of `cache.dataset`.
        out_dir: the sweep folder.
        options: device, chunking, checkpointing, progress.

    Raises:
        FolderInUseError: another process is running a sweep in `out_dir` (one writer per folder: fastprompt/locks.py).
    """
    with FolderLock(out_dir, "fastprompt train", remedy="pass another --out"):
        return _sweep(cache, clip, configs, Path(out_dir), options or SweepOptions())


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
    for config in [c for c in pending if not c.uses_prompt]:
        metrics, *rest = _baseline(config, views[config.setting], clip, prograd_tpl, coop_tpl)
        if targets and config.method in ("zeroshot", "zeroshot_ensemble"):
            metrics["targets"] = targets.zero_shot_accuracies(config.method == "zeroshot_ensemble")
        writer.write(config, cache, metrics, *rest)
    groups: dict[tuple, list[RunConfig]] = defaultdict(list)
    for config in [c for c in configs if c.uses_prompt]:  # finished runs too: a rerun's groups are the first run's
        prefix = template_prefix(prograd_tpl) if config.init == "template" else None
        key = (config.setting, prefix, config.n_ctx, config.position, config.class_specific, config.precision)
        groups[key].append(config)
    chunks = [
        (key, [c for c in members[start : start + options.max_group] if not writer.finished(c.run_id)])
        for key, members in groups.items()
        for start in range(0, len(members), options.max_group)
    ]
    chunks = [(key, chunk) for key, chunk in chunks if chunk]
    total = sum(_total_steps(c, views[c.setting]) for _, chunk in chunks for c in chunk)
    progress = _progress(total, options.progress)
    for (setting, prefix, *_), chunk in chunks:
        done = _train_group(chunk, views[setting], clip, prefix, prograd_tpl, writer, options, progress, cache, targets)
        if not done:
            progress.close()
            return writer.records()
    progress.close()
    return writer.records()


def _total_steps(config: RunConfig, view: DatasetView) -> int:
    rows, _, _, _ = view.subset(config.shots, config.seed)
    return Schedule(rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr).total_steps


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="training", dynamic_ncols=True)


def _train_group(configs, view, clip, prefix, prograd_tpl, writer, options, progress, cache, targets) -> bool:
    from fastprompt.encoder import PromptEncoder

    first = configs[0]
    encoder = PromptEncoder(
        clip,
        view.base_names,
        n_ctx=first.n_ctx,
        position=first.position,
        class_specific=first.class_specific,
        prompt_prefix=prefix,
    )
    new_encoder = None
    if view.new_names:
        new_encoder = PromptEncoder(
            clip, view.new_names, n_ctx=first.n_ctx, position=first.position, class_specific=False, prompt_prefix=prefix
        )
    teachers = {}
    if any(c.uses_teacher for c in configs):
        teachers["single"] = zero_shot_weights(clip, view.base_names, prograd_tpl)
        if any(c.method == "prograd_ensemble" for c in configs):
            teachers["ensemble"] = zero_shot_weights(clip, view.base_names, ensemble_templates(cache.dataset))
    runs, contexts, keys = [], [], {}
    for config in configs:
        rows, labels, train_keys, val_keys = view.subset(config.shots, config.seed)
        keys[config.run_id] = (train_keys, val_keys)
        schedule = Schedule(
            rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr, config.warmup_epochs
        )
        teacher = None if not config.uses_teacher else ("ensemble" if config.method == "prograd_ensemble" else "single")
        runs.append(RunState(config, rows, labels, schedule, torch.Generator().manual_seed(config.seed), teacher))
        contexts.append(_initial_context(encoder, config))
    engine = LockstepEngine(
        encoder,
        view.train.features,
        runs,
        torch.stack(contexts),
        teachers,
        clip.logit_scale,
        class_chunk=options.class_chunk,
        update_fn=options.update_fn,
        autocast_dtype=AUTOCAST[first.precision],
    )
    _restore(engine, writer, progress)
    last_checkpoint, steps, finished = time.monotonic(), 0, 0
    started = time.monotonic()
    ending = _ended(engine, writer)  # runs restored at their end: checkpointed, killed before they were written
    stopping = False
    while True:
        for index in ending:
            run = engine.runs[index]
            _finish(run, engine.context(index), encoder, new_encoder, view, writer, keys, started, cache, targets)
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
                _close_epoch(run, encoder, engine.context(index), view)
        ending = _ended(engine, writer)
        stopping = options.stop_after_steps is not None and steps >= options.stop_after_steps
        if ending or stopping or time.monotonic() - last_checkpoint >= options.checkpoint_minutes * 60:
            # Before any run of this step is written (docs/reliability.md): a rerun resumes the group here as one.
            _checkpoint(engine, writer)
            last_checkpoint = time.monotonic()


def _initial_context(encoder, config: RunConfig) -> torch.Tensor:
    if config.init == "template":
        return encoder.initial_context("template")
    generator = torch.Generator().manual_seed(config.seed)
    if config.class_specific:
        rows = [random_context(config.n_ctx, encoder.width, generator) for _ in range(encoder.num_classes)]
        return torch.stack(rows).to(encoder.device)
    return random_context(config.n_ctx, encoder.width, generator).to(encoder.device)


def _close_epoch(run: RunState, encoder, context: torch.Tensor, view: DatasetView) -> None:
    totals, epoch = run.totals, run.epoch
    steps = max(totals.get("steps", 1.0), 1.0)
    record = {
        "epoch": epoch,
        "lr": totals.get("lr"),
        "loss": totals.get("loss", 0.0) / steps,
        "train_accuracy": 100.0 * totals.get("correct", 0.0) / max(totals.get("seen", 1.0), 1.0),
    }
    if run.config.method in ("prograd", "prograd_ensemble"):  # KD's update gradient is G_d + alpha G_g: no angle
        record["cos_mean"] = totals.get("cos", 0.0) / steps
        record["conflict_fraction"] = totals.get("conflicts", 0.0) / steps
    every = run.config.eval_every
    if every and (epoch % every == 0 or run.done):
        record["test_accuracy"] = _evaluate(encoder, context, view.test_base)[0]
    run.log.append(record)
    run.totals = {}


def _finish(run, context, encoder, new_encoder, view, writer, keys, started, cache, targets) -> None:
    metrics: dict = {}
    if run.status != "failed":
        base_acc, per_class = _evaluate(encoder, context, view.test_base)
        metrics = {"accuracy": base_acc, "per_class_accuracy": per_class}
        if new_encoder is not None:
            new_acc, _ = _evaluate(new_encoder, context, view.test_new)
            harmonic = 2 * base_acc * new_acc / (base_acc + new_acc) if base_acc + new_acc > 0 else 0.0
            metrics.update(base_accuracy=base_acc, new_accuracy=new_acc, harmonic_mean=harmonic)
        if targets and not run.config.class_specific:  # in each target's own prompt layout (transfer.py)
            metrics["targets"] = targets.prompt_accuracies(context, run.config)
    timings = {"train_seconds": time.monotonic() - started, "steps": run.step}
    train_keys, val_keys = keys[run.config.run_id]
    writer.write(
        run.config,
        cache,
        metrics,
        timings,
        train_keys,
        val_keys,
        context=context,
        log=run.log,
        status=run.status if run.status == "failed" else "done",
        reason=run.reason,
        divergence=run.divergence,
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


def _linear_probe_metrics(view: DatasetView, config: RunConfig, rows: torch.Tensor, labels: torch.Tensor) -> dict:
    """CoOp's lpclip (PROTOCOL.md section 6): one centre-view feature per training image (never the augmented views),
    not normalised; C searched on the few-shot validation images, or on the test images where the dataset has no
    validation split (ImageNet), as CoOp does there. `c_search_split` in the metrics says which.

    Raises:
        FastPromptError: the cache predates the training images' centre view (format 1): rebuild it.
    """
    from fastprompt.train.linear_probe import linear_probe

    cache = view.cache
    center = cache.center_features("train", "CoOp's linear probe")
    subset = cache.fewshot(config.shots, config.seed)
    val, test = cache.split("val"), cache.split("test")
    val_feats, val_labels = _select(
        val.center[subset.val_index], val.labels[subset.val_index], view.base, normalize=False
    )
    test_feats, test_labels = _select(test.center, test.labels, view.base, normalize=False)
    search_split = "val" if val_labels.numel() else "test"
    if search_split == "test":
        val_feats, val_labels = test_feats, test_labels
    result = linear_probe(
        center[rows.to(center.device)].float(),  # (n, D): one sample per training image
        labels.to(center.device),
        val_feats,
        val_labels,
        test_feats,
        test_labels,
        len(view.base_names),
        normalize=False,  # CoOp's probe fits the raw image-tower outputs
    )
    return {
        "accuracy": result.accuracy,
        "per_class_accuracy": result.per_class_accuracy,
        "best_c": result.best_c,
        "c_search_split": search_split,
    }


def _baseline(config: RunConfig, view: DatasetView, clip, prograd_tpl: str, coop_tpl: str):
    """Zero-shot CLIP, CLIP++ and the linear probe: (metrics, timings, train keys, val keys)."""
    started = time.monotonic()
    rows, labels, train_keys, val_keys = view.subset(config.shots, config.seed)
    if config.method == "linear_probe":
        metrics = _linear_probe_metrics(view, config, rows, labels)
    else:
        templates = coop_tpl if config.method == "zeroshot" else ensemble_templates(view.cache.dataset, coop_tpl)
        weights = zero_shot_weights(clip, view.base_names, templates)
        test_feats, test_labels = view.test_base
        acc, per_class = accuracy(
            (test_feats @ weights.T.to(test_feats.device)).argmax(-1), test_labels, len(view.base_names)
        )
        metrics = {"accuracy": acc, "per_class_accuracy": per_class}
        if view.new_names:
            new_weights = zero_shot_weights(clip, view.new_names, templates)
            new_feats, new_labels = view.test_new
            new_acc, _ = accuracy(
                (new_feats @ new_weights.T.to(new_feats.device)).argmax(-1), new_labels, len(view.new_names)
            )
            harmonic = 2 * acc * new_acc / (acc + new_acc) if acc + new_acc > 0 else 0.0
            metrics.update(base_accuracy=acc, new_accuracy=new_acc, harmonic_mean=harmonic)
    return metrics, {"train_seconds": time.monotonic() - started, "steps": 0}, train_keys, val_keys


__all__ = ["SweepOptions", "load_cache_clip", "run_sweep", "run_record"]  # load_cache_clip: its old home
