"""Run folders and the sweep index (docs/FORMATS.md): atomic writes, one results.jsonl line per finished run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastprompt.atomic import append_line, full_disk_reported, remove_stale_temporaries, write_bytes
from fastprompt.locks import taking_turns
from fastprompt.methods import METHODS
from fastprompt.train.config import RunConfig

INDEX = "results.jsonl"
SUMMARY_KEYS = ("accuracy", "base_accuracy", "new_accuracy", "harmonic_mean")


INDEX_POINT = "index"  # the fault points of the results.jsonl line (fastprompt/faults.py)
RUN_FILES = {
    "prompt.safetensors": "prompt",
    "predictions.npz": "predictions",
    "log.jsonl": "log",
    "result.json": "result",
    "checkpoint.pt": "checkpoint",
}
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the checkpoint before the newest: a kill mid-checkpoint falls back to it
KEPT = "finished runs are kept, the others resume from their last checkpoint"  # what a full disk leaves
INDEX_TURNS = ".results.jsonl.lock"  # in a shared sweep folder, results.jsonl is read and appended under its flock
_SHARED: set[str] = set()  # real paths of sweep folders that several processes write at once (torchrun ranks)


@contextlib.contextmanager
def shared_sweep_folder(root: Path) -> Iterator[None]:
    """Mark `root` as written by several processes at once (the ranks of one torchrun sweep) for the block.

    A ResultWriter made there only reads results.jsonl (under its flock, between the other ranks' appends) and
    appends its lines under the same flock: removing stale temporaries, a torn line or a lost line would race with
    the other ranks' writes, so the main rank repairs the folder once, before any rank writes
    (fastprompt/train/distributed.py).
    """
    key = os.path.realpath(root)
    _SHARED.add(key)
    try:
        yield
    finally:
        _SHARED.discard(key)


def read_index(root: Path) -> dict[str, dict]:
    """The records of `root`/results.jsonl by run id, read under its flock (a torn line skipped, a repeated one
    counted once); nothing is repaired."""
    index = Path(root) / INDEX
    with taking_turns(Path(root) / INDEX_TURNS):
        text = index.read_text() if index.exists() else ""
    records: dict[str, dict] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["run_id"]] = record
    return records


def atomic_write_bytes(path: Path, payload: bytes, point: str | None = None) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers never see half a file.

    `point` names the write's fault points (fastprompt/faults.py); default: the file's name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, payload, point or RUN_FILES.get(path.name, path.name))


def atomic_write_text(path: Path, text: str, point: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), point)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _predictions_npz(arrays: dict[str, torch.Tensor]) -> bytes:
    """int16 arrays in one uncompressed .npz (2 bytes per test image and array; class indices fit below 32768)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(t.detach().cpu(), dtype=np.int16) for name, t in arrays.items()})
    return buffer.getvalue()


def run_record(result: dict) -> dict:
    """The results.jsonl line of a run's result.json."""
    config = result["config"]
    record = {"run_id": result["run_id"], "path": result["run_id"], "status": result["status"]}
    for key in ("method", "dataset", "setting", "shots", "seed", "lambda", "alpha"):
        record[key] = config.get(key)
    for key in ("teacher", "augment", "angles"):  # later fields: only where set, so older lines stay as they were
        if config.get(key) not in (None, True if key == "augment" else False):
            record[key] = config[key]
    for key in SUMMARY_KEYS:
        record[key] = (result.get("metrics") or {}).get(key)
    timings = result.get("timings") or {}
    if timings.get("train_seconds") is not None:
        record["train_seconds"] = timings["train_seconds"]
        record["group_runs"] = timings.get("group_runs", 1)  # runs trained together in that wall time
        record["machine"] = (result.get("environment") or {}).get("devices")
    if (result.get("metrics") or {}).get("targets"):
        record["targets"] = result["metrics"]["targets"]
    return record


class ResultWriter:
    """Writes run folders under a sweep folder and keeps `results.jsonl` free of losses and duplicates."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        with full_disk_reported("the sweep folder", self.root.parent, KEPT):
            self.root.mkdir(parents=True, exist_ok=True)
        self._shared = os.path.realpath(self.root) in _SHARED
        if self._shared:
            self._records = read_index(self.root)
            return
        folders = [folder for folder in self.root.iterdir() if folder.is_dir()]
        remove_stale_temporaries(self.root, *folders, names=frozenset({INDEX, *RUN_FILES}))
        with full_disk_reported(INDEX, self.root, KEPT):
            self._records = self._repair_index()
        for run_id in self._records:  # a kill between a run's index line and the removal of its checkpoints
            self.remove_checkpoints(run_id)

    def _repair_index(self) -> dict[str, dict]:
        """Read results.jsonl, dropping a torn last line, and add runs whose result.json exists but whose line
        was lost (a kill between the two writes)."""
        records: dict[str, dict] = {}
        index = self.root / INDEX
        changed = False
        if index.exists():
            text = index.read_text()
            changed = bool(text) and not text.endswith("\n")  # the next line appended must start a line of its own
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    changed = True
                    continue
                if record.get("run_id") in records:
                    changed = True
                records[record["run_id"]] = record
        for result_path in sorted(self.root.glob("*/result.json")):
            run_id = result_path.parent.name
            if run_id not in records:
                records[run_id] = run_record(json.loads(result_path.read_text()))
                changed = True
        if changed:
            atomic_write_text(index, "".join(json.dumps(r) + "\n" for r in records.values()), "index-repair")
        return records

    def finished(self, run_id: str) -> bool:
        return run_id in self._records

    def records(self) -> list[dict]:
        return list(self._records.values())

    def write(
        self,
        config: RunConfig,
        cache,
        metrics: dict,
        timings: dict,
        train_keys: list[str],
        val_keys: list[str],
        context: torch.Tensor | None = None,
        log: list[dict] | None = None,
        status: str = "done",
        reason: str | None = None,
        divergence: dict | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        predictions: dict[str, torch.Tensor] | None = None,
        classes: list[str] | None = None,
    ) -> dict:
        """Write the run's folder (prompt, predictions, log, then result.json last) and append its results.jsonl line.

        Args:
            context: a prompt run's context (M, W), saved as "ctx" in prompt.safetensors.
            tensors: the trained tensors of other methods (CoCoOp's context and meta-net, a head's weights), saved in
                the same file by name.
            predictions: int arrays by name ("predictions", "labels", "new_predictions", "new_labels"), saved as int16
                in predictions.npz (the test split in the cache's order; docs/FORMATS.md).
            classes: the run's class names in its label order (a trained teacher is checked against them).
        """
        from fastprompt.env import environment

        folder = self.root / config.run_id
        saved = dict(tensors or {})
        if context is not None:
            saved["ctx"] = context
        if saved:
            from safetensors.torch import save

            payload = save({name: t.detach().float().cpu().contiguous() for name, t in saved.items()})
            with full_disk_reported(f"prompt.safetensors of run {config.run_id}", self.root, KEPT):
                atomic_write_bytes(folder / "prompt.safetensors", payload)
        if predictions:
            with full_disk_reported(f"predictions.npz of run {config.run_id}", self.root, KEPT):
                atomic_write_bytes(folder / "predictions.npz", _predictions_npz(predictions))
        if log is not None:
            with full_disk_reported(f"log.jsonl of run {config.run_id}", self.root, KEPT):
                atomic_write_text(folder / "log.jsonl", "".join(json.dumps(_clean(r)) + "\n" for r in log))
        manifest = cache.manifest
        result = {
            "run_id": config.run_id,
            "status": status,
            "reason": reason,
            "divergence": divergence,  # a diverged run: {"step", "epoch", "detected_at_step"} (engine.collect)
            "config": config.to_dict(),
            "cache": {
                "path": str(cache.path),
                "model": manifest.get("model", {}).get("name"),
                "pretrained": manifest.get("model", {}).get("pretrained"),
                "dataset": cache.dataset,
                "views": manifest.get("views"),
            },
            "fewshot": {"train_keys": list(train_keys), "val_keys": list(val_keys)},
            "classes": list(classes) if classes is not None else None,
            "metrics": _clean(metrics),
            "timings": timings,
            "environment": environment(),
        }
        with full_disk_reported(f"result.json of run {config.run_id}", self.root, KEPT):
            atomic_write_text(folder / "result.json", json.dumps(result, indent=1))
        record = run_record(result)
        turns = taking_turns(self.root / INDEX_TURNS) if self._shared else contextlib.nullcontext()
        with full_disk_reported(f"the {INDEX} line of run {config.run_id}", self.root, KEPT), turns:
            append_line(self.root / INDEX, json.dumps(record) + "\n", INDEX_POINT)
        self._records[config.run_id] = record
        self.remove_checkpoints(config.run_id)
        return result

    def save_checkpoint(self, run_id: str, state: dict) -> None:
        """Write checkpoint.pt atomically; the one it replaces stays as checkpoint.prev.pt (sweep.py `_restore`)."""
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.root / run_id / "checkpoint.pt"
        with full_disk_reported(f"the checkpoint of run {run_id}", self.root, KEPT):
            if path.exists():
                os.replace(path, path.with_name(PREVIOUS_CHECKPOINT))
            atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, run_id: str) -> dict | None:
        """The run's newest checkpoint, or None."""
        path = self.root / run_id / "checkpoint.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def load_checkpoints(self, run_id: str) -> dict[str, dict]:
        """The run's checkpoints by file name: the newest (checkpoint.pt) and the one before it, where they exist."""
        paths = [self.root / run_id / name for name in ("checkpoint.pt", PREVIOUS_CHECKPOINT)]
        return {path.name: torch.load(path, map_location="cpu", weights_only=False) for path in paths if path.exists()}

    def keep_checkpoint(self, run_id: str, name: str | None) -> None:
        """Keep only the checkpoint file `name` of the run, as checkpoint.pt (None: keep none): a run resumed at an
        older step forgets its newer checkpoint, which a later checkpoint would otherwise keep as the previous one."""
        folder = self.root / run_id
        if name == PREVIOUS_CHECKPOINT:
            os.replace(folder / PREVIOUS_CHECKPOINT, folder / "checkpoint.pt")
        elif name is None:
            (folder / "checkpoint.pt").unlink(missing_ok=True)
        (folder / PREVIOUS_CHECKPOINT).unlink(missing_ok=True)

    def remove_checkpoints(self, run_id: str) -> None:
        for name in ("checkpoint.pt", PREVIOUS_CHECKPOINT):
            (self.root / run_id / name).unlink(missing_ok=True)


def summary_table(records: list[dict], key: str = "accuracy") -> str:
    """Markdown table: one row per (dataset, setting, method, lambda/alpha), one column per shot count,
    mean and population standard deviation over seeds of `key`. For key "harmonic_mean" a cell is H = 2BN / (B + N)
    of the seed-mean base and new accuracies (PROTOCOL.md section 5), not the mean of the runs' own H."""
    from fastprompt.report import harmonic_mean

    parts = ("base_accuracy", "new_accuracy") if key == "harmonic_mean" else (key,)
    cells: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    shots_seen: set[int] = set()
    failed = 0
    for record in records:
        if record.get("status") != "done" or any(record.get(part) is None for part in parts):
            failed += record.get("status") == "failed"
            continue
        label = record["method"]
        knob = METHODS[label].knob if label in METHODS else None  # the swept knob tells rows apart (methods.py)
        if knob == "lambda" and record.get("lambda") not in (None, 1.0):
            label += f" (lambda {record['lambda']:g})"
        if knob == "alpha":
            label += f" (alpha {record.get('alpha', 1.0):g})"
        cells[(record["dataset"], record.get("setting", "fewshot"), label)][record["shots"]].append(record)
        shots_seen.add(record["shots"])
    shots = sorted(shots_seen)
    lines = ["| dataset | setting | method | " + " | ".join(f"{s} shots" for s in shots) + " |"]
    lines.append("|" + "---|" * (3 + len(shots)))
    for (dataset, setting, label), by_shots in sorted(cells.items()):
        row = []
        for s in shots:
            members = by_shots.get(s, [])
            if not members:
                row.append("")
            elif key == "harmonic_mean":
                base = statistics.fmean(r["base_accuracy"] for r in members)
                new = statistics.fmean(r["new_accuracy"] for r in members)
                row.append(f"{harmonic_mean(base, new):.2f} (n={len(members)})")
            else:
                values = [r[key] for r in members]
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                row.append(f"{statistics.fmean(values):.2f} ± {spread:.2f} (n={len(values)})")
        lines.append(f"| {dataset} | {setting} | {label} | " + " | ".join(row) + " |")
    if failed:
        lines.append(f"\n{failed} run(s) failed; see their result.json for the reason.")
    return "\n".join(lines)
