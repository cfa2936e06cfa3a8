"""The cache folder's bookkeeping: the plan record that a rerun must match, per-shard progress records, the manifest.

`.progress/plan.json` fingerprints a cache (model, weights, precision, transforms, views, dtype, data, subsets,
shards) and is written before extraction starts; `.progress/<shard>.json` is written after each shard's rename, so a
shard counts as done only when both exist and agree. The manifest is assembled from these records at the end.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from fastprompt.atomic import remove_stale_temporaries, write_json
from fastprompt.cache.plan import CachePlan, ShardPlan
from fastprompt.errors import FastPromptError
from fastprompt.locks import LOCK_FILE

FORMAT_VERSION = 2  # 2: training samples also hold their centre view (`center.npy`); 1 had only the augmented views
READABLE_FORMATS = (1, 2)  # a format-1 cache still trains prompts; what needs the centre view asks for a rebuild
PROGRESS_DIR = ".progress"
MANIFEST = "manifest.json"


def write_json_atomic(path: Path, content: dict, point: str | None = None) -> None:
    """Write JSON through a temporary file, fsync and a rename, so readers never see half a file.

    `point` names the write for the fault points (fastprompt/faults.py); default: the file's name.
    """
    write_json(Path(path), content, point or Path(path).name)


def plan_record(model: dict, transforms: dict, views: int, dtype: str, feature_dim: int, dataset, plan, full_train):
    """The fingerprint a rerun must match exactly (the parts that define every stored number), in JSON's types."""
    record = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "transforms": transforms,
        "views": views,
        "dtype": dtype,
        "feature_dim": feature_dim,
        "dataset": dataset.name,
        "classnames": dataset.classnames,
        "templates": dataset.templates,
        "full_train": full_train,
        "split_digests": plan.digest(),
        "fewshot": plan.fewshot,
        "shards": [[shard.name, shard.split, shard.start, shard.stop] for shard in plan.shards],
    }
    return json.loads(json.dumps(record))


def _describe_model(model: dict) -> str:
    return f"{model['name']} (weights sha256 {model['weights_sha256'][:12]}, precision {model['precision']})"


def check_folder(out: Path, record: dict) -> bool:
    """Accept `out` for this cache: new, empty, or holding the same cache (complete or partial).

    Returns:
        True when `out` already holds (part of) this cache.

    Raises:
        FastPromptError: `out` holds another cache (another model, weights, transforms or settings) or other files.
    """
    plan_path = Path(out) / PROGRESS_DIR / "plan.json"
    if not plan_path.is_file():
        if (Path(out) / MANIFEST).is_file():
            raise FastPromptError(
                f"'{out}' holds a finished cache without its {PROGRESS_DIR}/ records, so it cannot be checked or "
                f"extended; load it with FeatureCache, or pass another --out to build a new one."
            )
        progress = Path(out) / PROGRESS_DIR  # an empty one: a first run killed before its plan record was written
        if Path(out).is_dir() and any(  # our lock file (fastprompt/locks.py) is no foreign content
            p.name != LOCK_FILE and (p != progress or any(p.iterdir())) for p in Path(out).iterdir()
        ):
            raise FastPromptError(
                f"'{out}' is not empty and holds no fastprompt cache in progress; pass a new or empty --out folder."
            )
        return False
    existing = json.loads(plan_path.read_text())
    remedy = f"caches are never mixed: pass another --out, or delete '{out}' to rebuild it."
    old_model, new_model = existing.get("model", {}), record["model"]
    if any(old_model.get(field) != new_model[field] for field in ("name", "weights_sha256", "precision")):
        raise FastPromptError(
            f"'{out}' holds a cache made with {_describe_model(old_model)}, not {_describe_model(new_model)}; {remedy}"
        )
    if existing.get("transforms") != record["transforms"]:
        raise FastPromptError(f"'{out}' holds a cache made with other image transforms; {remedy}")
    differing = sorted(field for field in record if existing.get(field) != record[field])
    if differing:
        raise FastPromptError(
            f"'{out}' holds a cache made with other settings (differing: {', '.join(differing)}); {remedy}"
        )
    return True


def remove_stale_files(out: Path) -> None:
    """Remove the temporary files that killed runs left in the cache folder `out` (only in one of ours)."""
    if (Path(out) / PROGRESS_DIR).is_dir():
        remove_stale_temporaries(Path(out), Path(out) / PROGRESS_DIR)


def start_folder(out: Path, record: dict) -> None:
    """Create the folder and its plan record (rank 0, before any shard is written)."""
    (Path(out) / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    plan_path = Path(out) / PROGRESS_DIR / "plan.json"
    if not plan_path.is_file():
        write_json_atomic(plan_path, record)


def write_shard_record(out: Path, entry: dict, skipped: list[dict]) -> None:
    write_json_atomic(Path(out) / PROGRESS_DIR / f"{entry['name']}.json", {**entry, "skipped": skipped}, "shard-record")


def done_shards(out: Path, shards: list[ShardPlan]) -> dict[str, dict]:
    """The shards whose progress record exists and whose file exists with the recorded size."""
    done = {}
    for shard in shards:
        record_path = Path(out) / PROGRESS_DIR / f"{shard.name}.json"
        shard_path = Path(out) / shard.name
        if record_path.is_file() and shard_path.is_file():
            record = json.loads(record_path.read_text())
            if record.get("bytes") == shard_path.stat().st_size:
                done[shard.name] = record
    return done


def assemble_manifest(record: dict, plan: CachePlan, shard_records: dict[str, dict]) -> dict:
    """The manifest of docs/FORMATS.md from the plan record and every shard's progress record."""
    from fastprompt import __version__

    entries = [shard_records[shard.name] for shard in plan.shards]
    skipped = [item for entry in entries for item in entry["skipped"]]
    skipped_keys = {item["path"] for item in skipped}
    counts = {split: 0 for split in plan.splits}
    for entry in entries:
        counts[entry["split"]] += entry["count"]
    fewshot = {
        name: {part: [key for key in keys if key not in skipped_keys] for part, keys in subset.items()}
        for name, subset in plan.fewshot.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastprompt_version": __version__,
        "model": record["model"],
        "transforms": record["transforms"],
        "views": record["views"],
        "feature_dim": record["feature_dim"],
        "dtype": record["dtype"],
        "dataset": record["dataset"],
        "classnames": record["classnames"],
        "templates": record["templates"],
        "full_train": record["full_train"],
        "splits": {
            split: {"count": counts[split], "views": plan.views[split], "center": plan.center[split]}
            for split in ("train", "val", "test")
        },
        "fewshot": fewshot,
        "shards": [
            {field: entry[field] for field in ("name", "split", "count", "bytes", "sha256")} for entry in entries
        ],
        "skipped": skipped,
    }
