"""Run folders and the sweep index (docs/FORMATS.md): atomic writes, one results.jsonl line per finished run."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fastprompt.train.config import RunConfig

INDEX = "results.jsonl"
SUMMARY_KEYS = ("accuracy", "base_accuracy", "new_accuracy", "harmonic_mean")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_record(result: dict) -> dict:
    """The results.jsonl line of a run's result.json."""
    config = result["config"]
    record = {"run_id": result["run_id"], "path": result["run_id"], "status": result["status"]}
    for key in ("method", "dataset", "setting", "shots", "seed", "lambda", "alpha"):
        record[key] = config.get(key)
    for key in SUMMARY_KEYS:
        record[key] = (result.get("metrics") or {}).get(key)
    if (result.get("metrics") or {}).get("targets"):
        record["targets"] = result["metrics"]["targets"]
    return record


class ResultWriter:
    """Writes run folders under a sweep folder and keeps `results.jsonl` free of losses and duplicates."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._records = self._repair_index()

    def _repair_index(self) -> dict[str, dict]:
        """Read results.jsonl, dropping a torn last line, and add runs whose result.json exists but whose line
        was lost (a kill between the two writes)."""
        records: dict[str, dict] = {}
        index = self.root / INDEX
        changed = False
        if index.exists():
            for line in index.read_text().splitlines():
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
            atomic_write_text(index, "".join(json.dumps(r) + "\n" for r in records.values()))
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
    ) -> dict:
        """Write the run's folder (prompt, log, then result.json last) and append its results.jsonl line."""
        from fastprompt.env import environment

        folder = self.root / config.run_id
        folder.mkdir(parents=True, exist_ok=True)
        if context is not None:
            from safetensors.torch import save

            atomic_write_bytes(
                folder / "prompt.safetensors", save({"ctx": context.detach().float().cpu().contiguous()})
            )
        if log is not None:
            atomic_write_text(folder / "log.jsonl", "".join(json.dumps(_clean(r)) + "\n" for r in log))
        manifest = cache.manifest
        result = {
            "run_id": config.run_id,
            "status": status,
            "reason": reason,
            "config": config.to_dict(),
            "cache": {
                "path": str(cache.path),
                "model": manifest.get("model", {}).get("name"),
                "pretrained": manifest.get("model", {}).get("pretrained"),
                "dataset": cache.dataset,
                "views": manifest.get("views"),
            },
            "fewshot": {"train_keys": list(train_keys), "val_keys": list(val_keys)},
            "metrics": _clean(metrics),
            "timings": timings,
            "environment": environment(),
        }
        atomic_write_text(folder / "result.json", json.dumps(result, indent=1))
        record = run_record(result)
        with open(self.root / INDEX, "a") as index:
            index.write(json.dumps(record) + "\n")
            index.flush()
            os.fsync(index.fileno())
        self._records[config.run_id] = record
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        return result

    def save_checkpoint(self, run_id: str, state: dict) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.root / run_id / "checkpoint.pt", buffer.getvalue())

    def load_checkpoint(self, run_id: str) -> dict | None:
        path = self.root / run_id / "checkpoint.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)


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
        if record["method"] in ("prograd", "prograd_ensemble") and record.get("lambda") not in (None, 1.0):
            label += f" (lambda {record['lambda']:g})"
        if record["method"] == "kd":
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
