"""Near-duplicate audit of a feature cache: training images that (nearly) repeat a test image or each other.

Two images count as near-duplicates when the cosine similarity of their centre-view features (the test transform,
so an image stored twice gives the same feature twice) is at least a threshold. For each audited training subset (a
cached few-shot subset, or the whole cached training split) the audit finds
- training-test pairs: a training image of the subset and a test image;
- training-training pairs: two different training images of the subset;
by a faiss range search on the normalised features (fastprompt/faiss_index.py), never forming the full similarity
matrix. `audit_features` takes the search as an argument so tests can run it with the plain `range_search_ref`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastprompt.atomic import write_bytes
from fastprompt.errors import FastPromptError
from fastprompt.faiss_index import RangeMatches, range_search

# Normalising and the fp32 dot product each round, so an image stored twice scores 1 +- a few 1e-7, not exactly 1;
# a pair this close below the threshold still counts, or --threshold 1 would miss exact copies.
SIMILARITY_SLACK = 1e-5
ALL_TRAIN = "all-train"
TRAIN_TEST = "train-test"
TRAIN_TRAIN = "train-train"
CSV_COLUMNS = ("subset", "kind", "similarity", "train_key", "train_class", "other_key", "other_class")

if TYPE_CHECKING:
    from fastprompt.cache.loader import FeatureCache

Search = Callable[[torch.Tensor, torch.Tensor, float], RangeMatches]


@dataclass(frozen=True)
class DuplicatePair:
    """One near-duplicate pair.

    Attributes:
        subset: the audited training subset ("16-1": 16 shots, seed 1; or "all-train").
        kind: "train-test" (other_key is a test image) or "train-train" (another training image of the subset).
        similarity: cosine similarity of the two centre-view features.
        train_key, train_class: the training image's key and class name (of a train-train pair: the key that sorts
            first).
        other_key, other_class: the other image's key and class name.
    """

    subset: str
    kind: str
    similarity: float
    train_key: str
    train_class: str
    other_key: str
    other_class: str


@dataclass(frozen=True)
class SubsetAudit:
    """The audit of one training subset against the test split.

    Attributes:
        subset: "K-S" for a few-shot subset, or "all-train".
        threshold: the cosine similarity at or above which a pair was reported.
        train_images: number of training images audited.
        test_images: number of test images.
        pairs: the pairs found, most similar first.
    """

    subset: str
    threshold: float
    train_images: int
    test_images: int
    pairs: list[DuplicatePair]

    @property
    def test_with_duplicate(self) -> int:
        """How many test images have at least one near-duplicate in the training subset."""
        return len({pair.other_key for pair in self.pairs if pair.kind == TRAIN_TEST})

    @property
    def test_share(self) -> float:
        """test_with_duplicate / test_images (0 without test images)."""
        return self.test_with_duplicate / self.test_images if self.test_images else 0.0

    def summary(self) -> str:
        """One line: the pair counts and the share of test images with a near-duplicate in the subset."""
        train_test = sum(pair.kind == TRAIN_TEST for pair in self.pairs)
        name = "the whole training split" if self.subset == ALL_TRAIN else f"subset {self.subset}"
        return (
            f"{name}: {len(self.pairs)} near-duplicate pair(s) at cosine >= {self.threshold:g} ({train_test} "
            f"training-test, {len(self.pairs) - train_test} training-training); {self.test_with_duplicate} of "
            f"{self.test_images} test images ({100 * self.test_share:.1f}%) have a near-duplicate among its "
            f"{self.train_images} training images."
        )


def check_threshold(threshold: float) -> float:
    """The threshold if it lies in (0, 1].

    Raises:
        FastPromptError: otherwise (NaN included).
    """
    if not (0.0 < threshold <= 1.0):  # written so that NaN fails too
        raise FastPromptError(f"--threshold is a cosine similarity in (0, 1], got {threshold}; 0.95 is the default.")
    return float(threshold)


def normalised(features: torch.Tensor) -> torch.Tensor:
    """(N, D) features as unit vectors, fp32 on the CPU (a zero vector stays zero: similarity 0 to everything)."""
    features = features.detach().to(device="cpu", dtype=torch.float32)
    return features / features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def audit_features(
    subset: str,
    train: torch.Tensor,
    train_keys: Sequence[str],
    train_classes: Sequence[str],
    test: torch.Tensor,
    test_keys: Sequence[str],
    test_classes: Sequence[str],
    threshold: float,
    search: Search = range_search,
) -> SubsetAudit:
    """Near-duplicate pairs of one training subset, with the test split and within itself.

    Args:
        subset: the subset's name for the report ("16-1", "all-train").
        train: (N, D) normalised features of the subset's training images.
        train_keys, train_classes: N image keys and class names.
        test: (T, D) normalised features of the test images.
        test_keys, test_classes: T image keys and class names.
        threshold: cosine similarity in (0, 1] at or above which a pair is reported.
        search: the range search (`range_search`; `range_search_ref` gives the plain computation).

    Returns:
        The audit, pairs sorted by similarity (highest first), then by keys.
    """
    check_threshold(threshold)
    bound = threshold - SIMILARITY_SLACK
    pairs = []
    with_test = search(train, test, bound)
    for row, column, similarity in _triples(with_test):
        pairs.append(DuplicatePair(subset, TRAIN_TEST, similarity, train_keys[row], train_classes[row],
                                   test_keys[column], test_classes[column]))  # fmt: skip
    within = search(train, train, bound)
    for row, column, similarity in _triples(within):
        if row < column:  # each unordered pair once, and never an image with itself
            first, second = sorted((row, column), key=lambda position: train_keys[position])
            pairs.append(DuplicatePair(subset, TRAIN_TRAIN, similarity, train_keys[first], train_classes[first],
                                       train_keys[second], train_classes[second]))  # fmt: skip
    pairs.sort(key=lambda pair: (-pair.similarity, pair.kind, pair.train_key, pair.other_key))
    return SubsetAudit(subset, threshold, len(train_keys), len(test_keys), pairs)


def audit_cache(
    cache: FeatureCache,
    threshold: float = 0.95,
    shots: int | None = None,
    seed: int | None = None,
    all_train: bool = False,
    search: Search = range_search,
) -> list[SubsetAudit]:
    """Audit a feature cache's training subsets against its test split.

    Args:
        cache: the loaded feature cache.
        threshold: cosine similarity in (0, 1] at or above which a pair is reported.
        shots, seed: audit only the cached few-shot subsets of this size and/or seed (None: any).
        all_train: audit the whole cached training split (every image it holds) as one subset instead.
        search: the range search (see `audit_features`).

    Returns:
        One audit per subset, in the order (shots, seed).

    Raises:
        FastPromptError: a threshold outside (0, 1]; shots or seed together with all_train; no cached subset matching
            shots and seed (or none at all); a cache without the centre view of its training images (format 1).
    """
    check_threshold(threshold)
    if all_train and (shots is not None or seed is not None):
        raise FastPromptError("--all-train audits the whole training split; drop --shots and --seed, or drop it.")
    train_split, test_split = cache.split("train"), cache.split("test")
    classnames = cache.classnames
    train = normalised(cache.center_features("train", "the near-duplicate audit"))
    test = normalised(test_split.center)
    train_classes = [classnames[label] for label in train_split.labels.tolist()]
    test_classes = [classnames[label] for label in test_split.labels.tolist()]
    if all_train:
        if not train_split.keys:
            raise FastPromptError(f"The cache '{cache.path}' holds no training images; there is nothing to audit.")
        return [
            audit_features(
                ALL_TRAIN,
                train,
                train_split.keys,
                train_classes,
                test,
                test_split.keys,
                test_classes,
                threshold,
                search,
            )  # fmt: skip
        ]
    held = sorted(cache.fewshot_settings())
    if not held:
        raise FastPromptError(
            f"The cache '{cache.path}' holds no few-shot subsets; pass --all-train to audit its whole training split."
        )
    chosen = [(k, s) for k, s in held if (shots is None or k == shots) and (seed is None or s == seed)]
    if not chosen:
        asked = " ".join(part for part in (_option("--shots", shots), _option("--seed", seed)) if part)
        holds = ", ".join(f"{k} shots seed {s}" for k, s in held)
        raise FastPromptError(
            f"The cache '{cache.path}' holds no few-shot subset matching {asked} (it holds: {holds}); choose one of "
            f"those, or pass --all-train to audit its whole training split."
        )
    audits = []
    for k, s in chosen:
        index = cache.fewshot(k, s).train_index.cpu()
        keys = [train_split.keys[i] for i in index.tolist()]
        classes = [train_classes[i] for i in index.tolist()]
        audits.append(
            audit_features(
                f"{k}-{s}", train[index], keys, classes, test, test_split.keys, test_classes, threshold, search
            )  # fmt: skip
        )
    return audits


def pairs_table(audits: Sequence[SubsetAudit], limit: int | None = None) -> list[str]:
    """The pairs as aligned text lines, a header first; at most `limit` pairs per subset (None: all)."""
    header = ("subset", "kind", "cosine", "training image (class)", "matched image (class)")
    rows, hidden = [], 0
    for audit in audits:
        shown = audit.pairs if limit is None else audit.pairs[:limit]
        hidden += len(audit.pairs) - len(shown)
        rows += [
            (pair.subset, pair.kind, f"{pair.similarity:.4f}", f"{pair.train_key} ({pair.train_class})",
             f"{pair.other_key} ({pair.other_class})")
            for pair in shown
        ]  # fmt: skip
    if not rows:
        return []
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + f"  {row[-1]}"
             for row in [header, *rows]]  # fmt: skip
    if hidden:
        lines.append(f"... and {hidden} more pair(s), not shown (--limit); --out writes them all.")
    return lines


def csv_text(audits: Sequence[SubsetAudit]) -> str:
    """Every pair of every audit as CSV (`CSV_COLUMNS`, similarity with 6 decimals)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for audit in audits:
        for pair in audit.pairs:
            writer.writerow((pair.subset, pair.kind, f"{pair.similarity:.6f}", pair.train_key, pair.train_class,
                             pair.other_key, pair.other_class))  # fmt: skip
    return stream.getvalue()


def write_csv(path: Path | str, audits: Sequence[SubsetAudit]) -> Path:
    """Write `csv_text(audits)` to `path` atomically (creating its folder).

    Raises:
        FastPromptError: `path` is an existing folder.
    """
    path = check_csv_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, csv_text(audits).encode(), point="audit")
    return path


def check_csv_path(path: Path | str) -> Path:
    """`path` if a file can go there (commands check it before the audit, not after).

    Raises:
        FastPromptError: `path` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise FastPromptError(f"--out '{path}' is a folder; give a file name such as {path / 'duplicates.csv'}.")
    return path


def _triples(matches: RangeMatches) -> list[tuple[int, int, float]]:
    return list(zip(matches.query_index.tolist(), matches.key_index.tolist(), matches.similarity.tolist(), strict=True))


def _option(name: str, value: int | None) -> str:
    return "" if value is None else f"{name} {value}"
