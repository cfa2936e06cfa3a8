"""`fastprompt audit` on a real cache with planted duplicates, and its library against a brute-force computation.

The cache is made by `build_cache` from generated shapes-world scenes (fastprompt.testbed) encoded by the shipped
testbed CLIP: a random-weight tiny CLIP maps every image to nearly the same direction (cosine 0.96 to 0.99 between
unrelated noise images, measured), so it could not tell a copy from an unrelated image. Each scene differs from the
others in shape or colour; the planted duplicates are test images that are copies of few-shot training images
(the same file; a re-encoded JPEG; a 1-pixel shift), one training image that is a copy of another, and a test image
that is a copy of both.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from fastprompt.cli.app import load_commands
from numerics import assert_close
from PIL import Image
from typer.testing import CliRunner

from fastprompt import faults
from fastprompt.audit import (
    ALL_TRAIN,
    CSV_COLUMNS,
    SIMILARITY_SLACK,
    TRAIN_TEST,
    TRAIN_TRAIN,
    audit_cache,
    audit_features,
    csv_text,
    normalised,
)
from fastprompt.cache.extract import build_cache
from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions, fewshot_subsets
from fastprompt.data.registry import load_dataset, register_dataset
from fastprompt.errors import FastPromptError
from fastprompt.faiss_index import range_search, range_search_ref
from fastprompt.testbed import WEIGHTS_DIR, load_testbed_clip
from fastprompt.testbed.world import SHAPES, render, sample_scenes

DATASET = "AuditToy"
CLASS_SHAPES = ("circle", "triangle", "cross", "heart")
PER_SPLIT = (("train", 4), ("val", 1), ("test", 3))
OPTIONS = CacheOptions(shots=(2,), seeds=(1, 2), views=1, dtype="fp32")
# Between the planted copies' similarities and the unrelated pairs' (the fixture checks both sides of it).
THRESHOLD = 0.93
HIGH_THRESHOLD = 0.9999  # only byte-identical images reach it
V1_WEIGHTS = "fastprompt-testbed-v1.safetensors"  # the model trained on the world whose scenes render_scenes draws


def render_scenes(count: int, seed: int = 0) -> np.ndarray:
    """(count, 64, 64, 3) uint8 scenes: image i has shape CLASS_SHAPES[i // per class] and a colour of its own."""
    per_class = count // len(CLASS_SHAPES)
    index = np.arange(count)
    shape = np.array([SHAPES.index(CLASS_SHAPES[i // per_class]) for i in index])
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, count, shape=shape, colour=index % per_class, texture=index % 6,
                           background=(3 * index + index // per_class) % 5)  # fmt: skip
    return render(scenes, rng)


def shifted(image: Image.Image) -> Image.Image:
    """The image moved one pixel to the right (the first column repeated)."""
    pixels = np.asarray(image)
    return Image.fromarray(np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1))


def reencoded_jpeg(image: Image.Image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="JPEG", quality=90)
    return stream.getvalue()


def write_dataset(root):
    """The dataset in the CoOp layout, then the planted copies.

    Returns:
        (every planted pair, the planted pairs of identical files), each pair as an audit reports it: (kind, training
        key, test key) or (kind, training key, training key sorting after it).
    """
    images = root / "audit_toy" / "images"
    per_class = sum(count for _, count in PER_SPLIT)
    pictures = render_scenes(per_class * len(CLASS_SHAPES))
    rows = {split: [] for split, _ in PER_SPLIT}
    for label, shape in enumerate(CLASS_SHAPES):
        position = label * per_class
        for split, count in PER_SPLIT:
            for number in range(count):
                suffix = "jpg" if (split, number, label) == ("test", 0, 1) else "png"
                key = f"{shape}/{split}_{number}.{suffix}"
                (images / key).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pictures[position]).save(images / key)
                rows[split].append([key, label, shape])
                position += 1
    (root / "audit_toy" / "split_zhou_AuditToy.json").write_text(json.dumps(rows))
    register_dataset(DATASET, "audit_toy", "images", replace=True)
    subset_train = fewshot_subsets(load_dataset(DATASET, root), (2,), (1,))["2-1"][0]
    first = {label: [item.key for item in subset_train if item.label == label] for label in range(len(CLASS_SHAPES))}
    circle, triangle, cross, heart = (first[label] for label in range(len(CLASS_SHAPES)))
    (images / "circle/test_0.png").write_bytes((images / circle[0]).read_bytes())
    (images / "triangle/test_0.jpg").write_bytes(reencoded_jpeg(Image.open(images / triangle[0])))
    shifted(Image.open(images / cross[0])).save(images / "cross/test_0.png")
    (images / heart[1]).write_bytes((images / heart[0]).read_bytes())
    (images / "heart/test_0.png").write_bytes((images / heart[0]).read_bytes())  # one test image, two training copies
    heart_pair = tuple(sorted(heart[:2]))
    identical = {(TRAIN_TEST, circle[0], "circle/test_0.png"), (TRAIN_TRAIN, *heart_pair)}
    identical |= {(TRAIN_TEST, key, "heart/test_0.png") for key in heart[:2]}
    similar = {(TRAIN_TEST, triangle[0], "triangle/test_0.jpg"), (TRAIN_TEST, cross[0], "cross/test_0.png")}
    return identical | similar, identical


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The cache (built once for the module), its folder and the planted pairs."""
    root = tmp_path_factory.mktemp("data")
    pairs, identical = write_dataset(root)
    out = tmp_path_factory.mktemp("caches") / "audit"
    build_cache(
        load_dataset(DATASET, root),
        load_testbed_clip(WEIGHTS_DIR / V1_WEIGHTS),
        out,
        OPTIONS,
        num_workers=0,
        progress=False,
    )
    cache = FeatureCache(out)
    return {"cache": cache, "out": out, "pairs": pairs, "identical": identical}


def brute_force_similarities(cache: FeatureCache) -> dict[tuple[str, str], float]:
    """{(train key, other key): cosine similarity} for every training image with every test image and every other
    training image (both orders), in float64 numpy from the cached centre views."""
    train = cache.split("train").center.double().numpy()
    test = cache.split("test").center.double().numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    keys = cache.split("train").keys
    result = {}
    for other, other_keys in ((test, cache.split("test").keys), (train, keys)):
        similarity = train @ other.T
        for row, key in enumerate(keys):
            for column, other_key in enumerate(other_keys):
                if key != other_key:
                    result[(key, other_key)] = float(similarity[row, column])
    return result


def expected_pairs(pairs, subset_keys: set[str]) -> set[tuple[str, str, str]]:
    """The planted pairs whose training images all lie in the subset."""
    return {(kind, first, second) for kind, first, second in pairs
            if first in subset_keys and (kind == TRAIN_TEST or second in subset_keys)}  # fmt: skip


def reported(audit) -> set[tuple[str, str, str]]:
    return {(pair.kind, pair.train_key, pair.other_key) for pair in audit.pairs}


def test_planted_copies_are_near_duplicates_and_nothing_else_is(planted):
    similarity = brute_force_similarities(planted["cache"])
    planted_both_ways = {(first, second) for _, first, second in planted["pairs"]}
    planted_both_ways |= {(second, first) for kind, first, second in planted["pairs"] if kind == TRAIN_TRAIN}
    copies = [similarity[pair] for pair in planted_both_ways]
    others = [value for pair, value in similarity.items() if pair not in planted_both_ways]
    assert min(copies) >= THRESHOLD + 0.02, f"a planted copy scores {min(copies):.4f}"
    assert max(others) <= THRESHOLD - 0.02, f"unrelated images score up to {max(others):.4f}"


def test_audit_finds_exactly_the_planted_pairs_in_each_subset(planted):
    cache = planted["cache"]
    audits = audit_cache(cache, THRESHOLD)
    assert [audit.subset for audit in audits] == ["2-1", "2-2"]
    test_count = len(cache.split("test").keys)
    for audit in audits:
        subset_keys = set(cache.manifest["fewshot"][audit.subset]["train"])
        expected = expected_pairs(planted["pairs"], subset_keys)
        assert reported(audit) == expected and len(audit.pairs) == len(expected)  # each pair once
        assert audit.train_images == len(subset_keys) and audit.test_images == test_count
        assert audit.test_with_duplicate == len({test for kind, _, test in expected if kind == TRAIN_TEST})
        assert audit.test_share == audit.test_with_duplicate / test_count
    assert reported(audits[0]) == planted["pairs"]  # subset 2-1 holds every planted training image


def test_audit_of_the_whole_training_split(planted):
    cache = planted["cache"]
    (audit,) = audit_cache(cache, THRESHOLD, all_train=True)
    assert audit.subset == ALL_TRAIN
    assert reported(audit) == expected_pairs(planted["pairs"], set(cache.split("train").keys))


def test_high_threshold_keeps_only_identical_files(planted):
    (audit,) = audit_cache(planted["cache"], HIGH_THRESHOLD, shots=2, seed=1)
    assert reported(audit) == planted["identical"]
    assert all(abs(pair.similarity - 1) <= SIMILARITY_SLACK for pair in audit.pairs)
    (exact,) = audit_cache(planted["cache"], 1.0, shots=2, seed=1)  # rounding must not lose an exact copy
    assert reported(exact) == planted["identical"]


def test_pairs_sorted_and_classes_named(planted):
    (audit,) = audit_cache(planted["cache"], THRESHOLD, shots=2, seed=1)
    similarities = [pair.similarity for pair in audit.pairs]
    assert similarities == sorted(similarities, reverse=True)
    for pair in audit.pairs:
        assert pair.train_class == pair.train_key.split("/")[0] and pair.other_class == pair.other_key.split("/")[0]


def test_csv_holds_every_pair(planted):
    audits = audit_cache(planted["cache"], THRESHOLD)
    rows = list(csv.DictReader(io.StringIO(csv_text(audits))))
    assert tuple(rows[0]) == CSV_COLUMNS
    similarity = brute_force_similarities(planted["cache"])
    assert len(rows) == sum(len(audit.pairs) for audit in audits)
    for audit in audits:
        subset_rows = [row for row in rows if row["subset"] == audit.subset]
        assert {(row["kind"], row["train_key"], row["other_key"]) for row in subset_rows} == {
            (pair.kind, pair.train_key, pair.other_key) for pair in audit.pairs
        }
        for row in subset_rows:
            assert abs(float(row["similarity"]) - similarity[(row["train_key"], row["other_key"])]) < 1e-5  # 6 decimals
            assert row["train_class"] == row["train_key"].split("/")[0]


def test_cli_prints_table_summary_and_writes_csv(planted, tmp_path):
    out = tmp_path / "reports" / "duplicates.csv"
    args = [
        "audit",
        str(planted["out"]),
        "--shots",
        "2",
        "--seed",
        "1",
        "--threshold",
        str(THRESHOLD),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    (audit,) = audit_cache(planted["cache"], THRESHOLD, shots=2, seed=1)
    for pair in audit.pairs:
        assert re.search(rf"2-1\s+{pair.kind}\s+{pair.similarity:.4f}\s+{re.escape(pair.train_key)}", result.output)
    test_count = len(planted["cache"].split("test").keys)
    train_test = [pair for pair in planted["pairs"] if pair[0] == TRAIN_TEST]
    leaked = len({test for _, _, test in train_test})
    summary = (
        f"subset 2-1: {len(planted['pairs'])} near-duplicate pair(s) at cosine >= {THRESHOLD:g} ({len(train_test)} "
        f"training-test, {len(planted['pairs']) - len(train_test)} training-training); {leaked} of {test_count} test "
        f"images ({100 * leaked / test_count:.1f}%) have a near-duplicate"
    )
    assert summary in result.output
    assert out.read_text() == csv_text([audit])
    assert not list(out.parent.glob(".*.tmp"))


def test_csv_write_is_atomic_and_a_folder_is_refused(planted, tmp_path):
    out = tmp_path / "duplicates.csv"
    command = ["audit", str(planted["out"]), "--out", str(out)]
    assert CliRunner().invoke(load_commands(), [*command, "--threshold", str(THRESHOLD)]).exit_code == 0
    before = out.read_bytes()
    faults.arm(enospc_at="audit:rename")  # the disk fills after the new CSV is written beside the old one
    try:
        result = CliRunner().invoke(load_commands(), [*command, "--threshold", "0.5"])
    finally:
        faults.disarm()
    assert result.exit_code == 2 and "free space and rerun the same command" in result.output
    assert out.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["duplicates.csv"]
    result = CliRunner().invoke(load_commands(), ["audit", str(planted["out"]), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder; give a file name such as" in result.output


def test_cli_defaults_audit_every_subset_and_limit_rows(planted):
    result = CliRunner().invoke(load_commands(), ["audit", str(planted["out"]), "--threshold", "0.9", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "subset 2-1:" in result.output and "subset 2-2:" in result.output
    assert "more pair(s), not shown (--limit)" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "0"], r"--threshold is a cosine similarity in \(0, 1\], got 0.0"),
        (["--threshold", "1.5"], r"--threshold is a cosine similarity in \(0, 1\], got 1.5"),
        (["--threshold", "nan"], r"--threshold is a cosine similarity in \(0, 1\], got nan"),
        (
            ["--shots", "16"],
            r"holds no few-shot subset matching --shots 16 \(it holds: 2 shots seed 1, 2 shots seed 2\)",
        ),
        (["--shots", "2", "--seed", "7"], "holds no few-shot subset matching --shots 2 --seed 7"),
        (["--all-train", "--seed", "1"], "--all-train audits the whole training split; drop --shots and --seed"),
    ],
)
def test_cli_bad_input_is_one_sentence(planted, extra, message):
    result = CliRunner().invoke(load_commands(), ["audit", str(planted["out"]), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(message, result.output.replace("\n", " ")), result.output


def test_cli_wrong_path_and_help(tmp_path):
    result = CliRunner().invoke(load_commands(), ["audit", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist; build it with `fastprompt cache`" in result.output
    result = CliRunner().invoke(load_commands(), ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "is not a feature cache (no manifest.json)" in result.output
    help_text = CliRunner().invoke(load_commands(), ["audit", "--help"]).output
    assert "Examples" in help_text and "fastprompt audit caches/pets-rn50 --shots 16 --seed 1" in help_text


def synthetic_features(generator, count: int, dim: int) -> torch.Tensor:
    return normalised(torch.randn(count, dim, generator=generator))


def test_audit_of_synthetic_features_matches_brute_force_numpy():
    """Planted near-duplicates by tiny noise among random unit vectors: faiss and a numpy double loop agree."""
    generator = torch.Generator().manual_seed(0)
    train = synthetic_features(generator, 300, 48)
    test = synthetic_features(generator, 200, 48)
    planted_test = torch.randint(0, 200, (12,), generator=generator)
    test[planted_test] = normalised(train[:12] + 0.02 * torch.randn(12, 48, generator=generator))
    train[20:25] = normalised(train[25:30] + 0.02 * torch.randn(5, 48, generator=generator))
    keys = [f"train/{i}" for i in range(300)]
    test_keys = [f"test/{i}" for i in range(200)]
    threshold = 0.95
    audit = audit_features("synthetic", train, keys, ["c"] * 300, test, test_keys, ["c"] * 200, threshold)
    train64, test64 = train.double().numpy(), test.double().numpy()
    expected = {}
    for row in range(300):
        for column in range(200):
            expected[(TRAIN_TEST, keys[row], test_keys[column])] = float(train64[row] @ test64[column])
        for column in range(row + 1, 300):
            expected[(TRAIN_TRAIN, *sorted((keys[row], keys[column])))] = float(train64[row] @ train64[column])
    bound = threshold - SIMILARITY_SLACK
    borderline = {pair for pair, value in expected.items() if abs(value - bound) < 1e-6}
    wanted = {pair for pair, value in expected.items() if value >= bound} - borderline
    found = {(pair.kind, pair.train_key, pair.other_key): pair.similarity for pair in audit.pairs}
    assert set(found) - borderline == wanted
    assert len(wanted) >= 17 and len(wanted) < 40  # the planted pairs, and few chance ones among random vectors
    pairs = sorted(found)
    assert_close(torch.tensor([found[pair] for pair in pairs]), torch.tensor([expected[pair] for pair in pairs]),
                 what="audit similarities")  # fmt: skip


def test_audit_with_faiss_equals_audit_with_plain_range_search(planted):
    cache = planted["cache"]
    for threshold in (THRESHOLD, 0.5, 0.1):
        fast = audit_cache(cache, threshold, all_train=True, search=range_search)
        plain = audit_cache(cache, threshold, all_train=True, search=range_search_ref)
        assert [reported(audit) for audit in fast] == [reported(audit) for audit in plain]


def test_cache_without_training_centre_views_is_refused_in_one_sentence(planted, monkeypatch):
    cache = planted["cache"]
    without_center = dataclasses.replace(cache.split("train"), center=None)  # as a format-1 cache loads
    monkeypatch.setitem(cache._splits, "train", without_center)
    with pytest.raises(FastPromptError, match="holds no centre-crop feature of its training images, which the near"):
        audit_cache(cache, THRESHOLD)


def test_cache_without_subsets_points_to_all_train(planted, monkeypatch):
    monkeypatch.setitem(planted["cache"].manifest, "fewshot", {})  # as `fastprompt cache --full-train --shots none`
    with pytest.raises(FastPromptError, match="holds no few-shot subsets; pass --all-train to audit its whole"):
        audit_cache(planted["cache"], THRESHOLD)
    (audit,) = audit_cache(planted["cache"], THRESHOLD, all_train=True)
    assert reported(audit) == expected_pairs(planted["pairs"], set(planted["cache"].split("train").keys))
