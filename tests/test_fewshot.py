"""Few-shot subsets equal the paper toolkit's procedure (PROTOCOL.md section 5), written here independently."""

from __future__ import annotations

import json
import random

import pytest

from fastprompt.data.fewshot import relabel, sample_fewshot, split_base_new
from fastprompt.data.registry import load_dataset, register_dataset
from fastprompt.errors import FastPromptError

ITEMS_PER_CLASS = {0: 20, 1: 20, 2: 5, 3: 20, 4: 1, 5: 20, 6: 12, 7: 20, 8: 3, 9: 20}
VAL_PER_CLASS = {label: (2 if label in (4, 8) else 6) for label in range(10)}


def reference_subsets(train: list, val: list, shots: int, seed: int) -> tuple[list, list]:
    """The toolkit's procedure, from the protocol's text: items are [path, label, classname] rows."""
    random.seed(seed)

    def draw(source: list, k: int) -> list:
        by_label: dict[int, list] = {}
        for row in source:
            by_label.setdefault(row[1], []).append(row)
        picked = []
        for rows in by_label.values():
            if len(rows) >= k:
                picked.extend(random.sample(rows, k))
            else:
                picked.extend(rows)
        return picked

    return draw(train, shots), draw(val, min(shots, 4))


@pytest.fixture(scope="module")
def shuffled_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shuffle = random.Random(1234)
    rows = {"train": [], "val": [], "test": []}
    for split, counts in (("train", ITEMS_PER_CLASS), ("val", VAL_PER_CLASS), ("test", VAL_PER_CLASS)):
        for label, count in counts.items():
            rows[split] += [[f"class_{label}/{split}_{i:02d}.jpg", label, f"class_{label}"] for i in range(count)]
        shuffle.shuffle(rows[split])
    folder = root / "fewshot_toy"
    (folder / "images").mkdir(parents=True)
    (folder / "split_zhou_FewshotToy.json").write_text(json.dumps(rows))
    register_dataset("FewshotToy", "fewshot_toy", "images", replace=True)
    return root, rows


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_fewshot_subsets_equal_the_reference_procedure(shuffled_split, shots, seed):
    root, rows = shuffled_split
    dataset = load_dataset("FewshotToy", root)
    train, val = sample_fewshot(dataset.train, dataset.val, shots, seed)
    expected_train, expected_val = reference_subsets(rows["train"], rows["val"], shots, seed)
    assert [item.key for item in train] == [row[0] for row in expected_train]
    assert [item.key for item in val] == [row[0] for row in expected_val]
    assert [item.label for item in train] == [row[1] for row in expected_train]
    per_class = {label: min(shots, count) for label, count in ITEMS_PER_CLASS.items()}
    assert len(train) == sum(per_class.values())


def test_fewshot_without_validation_subset(shuffled_split):
    root, _ = shuffled_split
    dataset = load_dataset("FewshotToy", root)
    train, val = sample_fewshot(dataset.train, dataset.val, 4, 1, sample_val=False)
    assert val == [] and len(train) > 0
    with pytest.raises(FastPromptError, match="at least 1"):
        sample_fewshot(dataset.train, dataset.val, 0, 1)


@pytest.mark.parametrize(("classes", "base"), [(10, 5), (37, 19), (101, 51), (2, 1)])
def test_base_new_split_takes_ceil_half(classes, base):
    base_labels, new_labels = split_base_new(classes)
    assert base_labels == list(range(base)) and new_labels == list(range(base, classes))
    assert relabel([0, base, classes - 1], new_labels) == [-1, 0, classes - 1 - base]
