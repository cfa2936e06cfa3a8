"""Fuzzing (hypothesis) of every file the tool reads and of the command line's options: bad input gets one sentence.

Each format gets near-valid documents (a valid document with mutated fields: wrong types, missing keys, negative or
huge labels, NaN, very long or non-ASCII strings, `../../etc/passwd` and absolute paths, duplicate class names, empty
lists), the same documents with mutated bytes (truncated, non-UTF-8, a byte-order mark, UTF-16), raw random bytes and
a few pathological files (deep nesting, 5000-digit numbers). The real reader must return a well-formed result or raise
one `FastPromptError` whose message is one short line. The command line, driven through typer's `CliRunner`, must
succeed, print one `Error:` line, or print typer's usage error, never a traceback; commands whose arguments pass are
stopped where the real work (caching, training, the demo) would start.

Examples are drawn deterministically (`derandomize=True`). The default run draws `DEFAULT_EXAMPLES` per format;
`--runslow` adds a run of `SLOW_EXAMPLES` per format. Each test prints how many examples ran and how they ended
(`pytest -s tests/test_fuzz.py`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import pickle
import sys
import types
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
from fastprompt.cli.app import load_commands
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fastprompt.data import pkl_import
from fastprompt.data.pkl_import import TOOLKIT_RECORD, RestrictedUnpickler, import_fewshot_pkl
from fastprompt.data.registry import get_dataset_spec, load_dataset, register_dataset
from fastprompt.errors import FastPromptError
from fastprompt.train.config import METHODS, RunConfig, expand_sweep, load_sweep_file, resolve

SPLITS = ("train", "val", "test")
MAX_MESSAGE = 600  # characters; the longest honest messages name two paths or list the supported datasets
DEFAULT_EXAMPLES = {
    "split_file": 150, "manifest": 150, "classnames_file": 80, "imagenet_classnames": 60, "fgvc_variants": 80,
    "sweep_file": 120, "fewshot_pickle": 150, "cli_train": 60, "cli_cache": 40, "cli_other": 60,
}  # fmt: skip
SLOW_EXAMPLES = int(os.environ.get("FASTPROMPT_FUZZ_EXAMPLES", "2000"))  # per format, in the slow tier
BASE_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------------------------- the assertions
def assert_one_sentence(message: str) -> None:
    """A user-facing message: non-empty, one line, bounded, no traceback, ends like a sentence."""
    assert message.strip(), "empty error message"
    assert len(message.splitlines()) == 1, f"multi-line message: {message[:400]!r}"  # also \x1e, \u2028, ...
    assert len(message) <= MAX_MESSAGE, f"message of {len(message)} characters: {message[:300]!r}..."
    assert "Traceback" not in message, message
    assert message.rstrip().endswith((".", ".)", "?")), f"not a sentence: {message[-200:]!r}"


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder`, comparing normalised paths (no file system access)."""
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path.startswith(folder + os.sep)


def assert_dataset(dataset, contained: bool) -> None:
    """Every item has a string key and an integer label within the class list; `contained`: under the image root."""
    assert dataset.classnames and all(isinstance(name, str) and name for name in dataset.classnames)
    for split in SPLITS:
        for item in dataset.splits[split]:
            assert isinstance(item.key, str) and item.key, item
            assert type(item.label) is int and 0 <= item.label < len(dataset.classnames), item
            assert isinstance(item.classname, str), item
            if contained:
                assert inside(item.path, dataset.image_root), f"{item.path} escapes {dataset.image_root}"


def read_or_one_sentence(read, *args, **kwargs):
    """("ok", result) or ("error", None) after checking the FastPromptError's message."""
    try:
        return "ok", read(*args, **kwargs)
    except FastPromptError as error:
        assert_one_sentence(str(error))
        return "error", None


def fuzz(name: str, strategy, check, examples: int) -> Counter:
    """Run `check` on `examples` deterministic draws of `strategy`; print and return how the examples ended."""
    outcomes: Counter[str] = Counter()

    @settings(BASE_SETTINGS, max_examples=examples)
    @given(case=strategy)
    def run(case):
        outcomes[check(case)] += 1

    run()
    total = sum(outcomes.values())
    print(f"\nfuzz {name}: {total} examples: {dict(sorted(outcomes.items()))}")
    assert total >= min(examples, 20)
    return outcomes


# ---------------------------------------------------------------------------------------------- strategies
WEIRD_STRINGS = [
    "", " ", ".", "..", "../../etc/passwd", "/etc/passwd", "C:\\data\\x.jpg", "\\\\host\\share\\x.jpg",
    "a/../../b.jpg", "~/x.jpg", "./a.jpg", "a//b.jpg", "a\x00b", "a\x00b/c.jpg", "a\nb", "\ud800", "ünïcødé 猫", "🐈",
    "x" * 5000, "None", "nan", "-1", "1e309", "1,,2", "train", "TRAIN", "_", "a_b",
]  # fmt: skip
weird_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([-1, 0, 1, 2, 10**30, -(10**30)]),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(WEIRD_STRINGS),
)
weird_values = st.recursive(
    weird_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
classname_text = st.text(min_size=1, max_size=12) | st.sampled_from(["cat", "big_cat", "dog", "ünï 猫", "x" * 300])
path_text = st.from_regex(r"[a-z]{1,3}(/[a-z0-9_]{1,5}){0,2}\.jpg", fullmatch=True) | st.sampled_from(WEIRD_STRINGS)
PATHOLOGICAL = [b"", b"\n", b"[" * 100_000, b"{" * 100_000, b"1" * 5000, b"\xff\xfe\x00\x00", b"\x00" * 64,
                b"- " * 50_000, b'"' + b"\\" * 3 + b'"']  # fmt: skip


def _node_paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _node_paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _node_paths(value, (*prefix, index))


@st.composite
def mutated(draw, document, max_mutations: int = 3):
    """`document` with up to `max_mutations` nodes replaced by odd values, deleted, duplicated or emptied."""
    tree = copy.deepcopy(document)
    for _ in range(draw(st.integers(0, max_mutations))):
        path = draw(st.sampled_from(list(_node_paths(tree))))
        if not path:
            tree = draw(weird_values)
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        operation = draw(st.sampled_from(("replace", "replace", "delete", "duplicate", "empty")))
        if operation == "replace":
            parent[key] = draw(weird_values)
        elif operation == "delete":
            del parent[key]
        elif operation == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif operation == "duplicate":
            parent[draw(st.text(max_size=6))] = copy.deepcopy(parent[key])
        else:
            parent[key] = type(parent[key])() if isinstance(parent[key], list | dict | str) else 0
    return tree


@st.composite
def byte_mutated(draw, data: bytes):
    """`data` as is (mostly), or truncated, with odd bytes inserted or overwritten, a BOM, UTF-16, CRLF."""
    operation = draw(st.sampled_from(("keep",) * 6 + ("truncate", "insert", "overwrite", "bom", "utf16", "crlf")))
    odd_bytes = st.binary(min_size=1, max_size=6) | st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"])
    if operation == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if operation == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(odd_bytes) + data[at:]
    if operation == "overwrite":
        at = draw(st.integers(0, max(0, len(data) - 1)))
        return data[:at] + draw(odd_bytes) + data[at + 4 :]
    if operation == "bom":
        return b"\xef\xbb\xbf" + data
    if operation == "utf16":
        try:
            return data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
        except UnicodeDecodeError:  # binary content (a pickle): every byte as one character
            return data.decode("latin-1").encode("utf-16")
    if operation == "crlf":
        return data.replace(b"\n", b"\r\n")
    return data


class Blob(bytes):
    """File content whose repr, in hypothesis' report of a failing example, stays readable (a case can be 200 kB)."""

    def __repr__(self) -> str:
        text = bytes.__repr__(self)
        return text if len(text) <= 300 else f"{text[:200]}...{text[-60:]} ({len(self)} bytes)"


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8: one more odd input


@st.composite
def file_bytes(draw, documents, encode):
    """Mostly a mutated document, encoded and byte-mutated; sometimes random or pathological bytes."""
    kind = draw(st.sampled_from(("document",) * 8 + ("random", "pathological")))
    if kind == "random":
        return Blob(draw(st.binary(max_size=400)))
    if kind == "pathological":
        return Blob(draw(st.sampled_from(PATHOLOGICAL)))
    return Blob(draw(byte_mutated(encode(draw(mutated(draw(documents)))))))


@st.composite
def split_documents(draw):
    """A valid CoOp split file: every label appears in train; classes may share names."""
    names = draw(st.lists(classname_text, min_size=1, max_size=4))
    document = {split: [] for split in SPLITS}
    for label, name in enumerate(names):
        document["train"].append([draw(path_text), label, name])
    for split in SPLITS:
        for label in draw(st.lists(st.integers(0, len(names) - 1), max_size=3)):
            document[split].append([draw(path_text), label, names[label]])
    return document


def encode_json(tree) -> bytes:
    return utf8(json.dumps(tree))


@st.composite
def manifest_rows(draw):
    names = draw(st.lists(classname_text, min_size=1, max_size=4))
    with_classname = draw(st.booleans())
    labels = list(range(len(names))) + draw(st.lists(st.integers(0, len(names) - 1), max_size=3))
    rows = []
    for label in labels:
        row = {"path": draw(path_text), "label": label, "split": draw(st.sampled_from(SPLITS))}
        if with_classname:
            row["classname"] = names[label]
        rows.append(row)
    return {"rows": rows, "names": names, "with_classname": with_classname}


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def encode_manifest(rows, as_jsonl: bool) -> bytes:
    rows = rows if isinstance(rows, list) else [rows]
    if as_jsonl:
        return utf8("\n".join(json.dumps(row) for row in rows) + "\n")
    header: list[str] = []
    for row in rows:
        header += [key for key in row if key not in header] if isinstance(row, dict) else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        if isinstance(row, dict):
            writer.writerow([_cell(row.get(key, "")) for key in header])
        else:
            writer.writerow([_cell(value) for value in row] if isinstance(row, list) else [_cell(row)])
    return utf8(buffer.getvalue())


def encode_lines(lines) -> bytes:
    lines = lines if isinstance(lines, list) else [lines]
    return utf8("\n".join(_cell(line) for line in lines) + "\n")


@st.composite
def manifest_cases(draw):
    document = draw(manifest_rows())
    suffix = draw(st.sampled_from([".csv", ".jsonl", ".json", ".ndjson", ".CSV", ".txt", ""]))
    as_jsonl = suffix in (".jsonl", ".json", ".ndjson")
    if draw(st.integers(0, 4)) == 0:
        as_jsonl = not as_jsonl
    manifest = draw(byte_mutated(encode_manifest(draw(mutated(document["rows"])), as_jsonl)))
    if draw(st.integers(0, 9)) == 0:
        manifest = draw(st.binary(max_size=300) | st.sampled_from(PATHOLOGICAL))
    names = None
    if not document["with_classname"] or draw(st.booleans()):
        names = draw(byte_mutated(encode_lines(draw(mutated(document["names"])))))
    return suffix, Blob(manifest), None if names is None else Blob(names), draw(st.booleans())


@st.composite
def classname_lists(draw):
    names = draw(st.lists(classname_text, min_size=3, max_size=5))
    return names + draw(st.lists(st.sampled_from(names), max_size=2))  # duplicated names


@st.composite
def imagenet_cases(draw):
    wnids = ["n01", "n02", "n03", *draw(st.lists(st.from_regex(r"n0[0-9]{1,3}", fullmatch=True), max_size=2))]
    lines = [f"{wnid} {draw(classname_text)}" for wnid in wnids]
    data = draw(file_bytes(st.just(lines), encode_lines))
    return draw(st.sampled_from(["ImageNet", "ImageNetA", "ImageNetV2"])), data


@st.composite
def fgvc_cases(draw):
    variants = draw(st.lists(classname_text.filter(lambda n: "\n" not in n and n.strip()), min_size=1, max_size=4))
    files = {"variants.txt": variants}
    for split in SPLITS:
        chosen = draw(st.lists(st.sampled_from(variants), max_size=3))
        files[f"images_variant_{split}.txt"] = [f"{draw(st.from_regex(r'[0-9]{7}', fullmatch=True))} {variant}"
                                                for variant in chosen]  # fmt: skip
    target = draw(st.sampled_from(sorted(files)))
    files = {name: Blob(encode_lines(lines)) for name, lines in files.items()}
    files[target] = draw(file_bytes(st.just(files[target].decode("utf-8", "surrogatepass").splitlines()),
                                    encode_lines))  # fmt: skip
    return files


SWEEP_VALUES = {
    "method": st.sampled_from(METHODS), "methods": st.sampled_from(METHODS), "shots": st.sampled_from([1, 2, 4]),
    "seed": st.integers(1, 3), "seeds": st.integers(1, 3), "lambda": st.sampled_from([1.0, 0.8, 0.5]),
    "alpha": st.sampled_from([0.25, 1.0]), "epochs": st.integers(1, 5), "batch-size": st.sampled_from([8, 32]),
    "n_ctx": st.sampled_from([4, 16]), "init": st.sampled_from(["template", "random"]),
    "precision": st.sampled_from(["fp32", "bf16"]), "lr": st.sampled_from([0.002, 0.01]),
    "position": st.sampled_from(["end", "middle", "front"]), "class_specific": st.booleans(),
    "lambda_policy": st.sampled_from(["release", "paper"]),
}  # fmt: skip


@st.composite
def sweep_documents(draw):
    keys = draw(st.lists(st.sampled_from(sorted(SWEEP_VALUES)), max_size=4, unique=True))
    swept = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    document = {"sweep": {}, "fixed": {}}
    for key in keys:
        if key in swept:
            document["sweep"][key] = draw(st.lists(SWEEP_VALUES[key], min_size=1, max_size=3))
        else:
            document["fixed"][key] = draw(SWEEP_VALUES[key])
    return document


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"  # not TOML: a parse error, as a user would get
    return json.dumps(str(value))


def _toml_key(key) -> str:
    key = str(key)
    return key if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key) else json.dumps(key)


def encode_toml(document) -> bytes:
    if not isinstance(document, dict):
        return utf8(f"value = {_toml_value(document)}\n")
    top = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    tables = []
    for name, table in document.items():
        if isinstance(table, dict):
            tables += [f"[{_toml_key(name)}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    return utf8("\n".join([*top, *tables]) + "\n")


def encode_yaml(document) -> bytes:
    import yaml

    try:
        return utf8(yaml.safe_dump(document, allow_unicode=True))
    except yaml.YAMLError:
        return utf8(json.dumps(document))  # JSON is YAML


@st.composite
def sweep_cases(draw):
    suffix = draw(st.sampled_from([".toml", ".yaml", ".yml", ".toml", ".yaml", ".json", ""]))
    encode = encode_toml if suffix == ".toml" else encode_yaml
    return suffix, draw(file_bytes(sweep_documents(), encode))


# ---------------------------------------------------------------------------------------------- pickles
FORBIDDEN_CALLS = Counter()


def _forbidden_target(*args):
    FORBIDDEN_CALLS["called"] += 1  # a restricted unpickler that let this through would count here


FORBIDDEN_MODULE = "fuzz_forbidden"
_forbidden_target.__module__ = FORBIDDEN_MODULE
_forbidden_target.__qualname__ = _forbidden_target.__name__ = "target"
NEVER_IMPORTED = "fuzz_never_imported"


class _Datum:
    """Pickles as the toolkit's `Datum` with whatever state it is given."""

    def __init__(self, state):
        self._fuzz_state = state

    def __getstate__(self):
        return self._fuzz_state


_Datum.__module__, _Datum.__qualname__, _Datum.__name__ = TOOLKIT_RECORD[0], TOOLKIT_RECORD[1], TOOLKIT_RECORD[1]


class _Forbidden:
    """Pickles as a call of a global outside the allow-list."""

    def __init__(self, target, args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


@contextlib.contextmanager
def toolkit_modules():
    """The toolkit's module path, importable only while a test pickle is written."""
    names = ("dassl", "dassl.data", "dassl.data.datasets", TOOLKIT_RECORD[0])
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[TOOLKIT_RECORD[0]].Datum = _Datum
    try:
        yield
    finally:
        for name in names:
            del sys.modules[name]


PKL_PREFIX = "/home/someone/DATA/fuzz_pkl/images"
DEEP_PLACEHOLDER = "@@DEEP@@"


@st.composite
def pickle_documents(draw):
    names = draw(st.lists(classname_text, min_size=1, max_size=3))
    document = {}
    for split in ("train", "val"):
        labels = draw(st.lists(st.integers(0, len(names) - 1), max_size=3))
        document[split] = [{"_impath": f"{PKL_PREFIX}/{draw(path_text)}", "_label": label, "_domain": 0,
                            "_classname": names[label]} for label in labels]  # fmt: skip
    return document


def _materialise(content, draw):
    """Records (dicts in the train/val lists) become `_Datum`s; some nodes become forbidden calls."""
    if isinstance(content, dict):
        for split in ("train", "val"):
            if isinstance(content.get(split), list):
                content[split] = [_Datum(state) if isinstance(state, dict) else state for state in content[split]]
    if draw(st.integers(0, 5)) == 0:
        target, args = draw(st.sampled_from([(_forbidden_target, ("x",)), (eval, ("0",)), (print, ("fuzz",))]))
        forbidden = _Forbidden(target, args)
        if isinstance(content, dict) and isinstance(content.get("train"), list):
            content["train"].append(forbidden)
        else:
            content = forbidden
    return content


@st.composite
def pickle_cases(draw):
    kind = draw(st.sampled_from(("document",) * 7 + ("random", "deep", "raw-global")))
    if kind == "random":
        return Blob(draw(st.binary(max_size=400)))
    if kind == "raw-global":
        module = draw(st.sampled_from([NEVER_IMPORTED, FORBIDDEN_MODULE, "os", "builtins", "copyreg"]))
        name = draw(st.sampled_from(["target", "system", "eval", "_reconstructor", "object", "a\nb"]))
        return Blob(f"\x80\x02c{module}\n{name}\n)R.".encode())
    protocol = draw(st.integers(0, pickle.HIGHEST_PROTOCOL))
    document = draw(pickle_documents())
    if kind == "deep":
        document["train"].append({"_impath": DEEP_PLACEHOLDER, "_label": 0, "_classname": "x"})
        protocol = 2
    content = _materialise(draw(mutated(document)), draw)
    with toolkit_modules():
        try:
            data = pickle.dumps(content, protocol=protocol)
        except (pickle.PicklingError, TypeError, ValueError, RecursionError):
            data = pickle.dumps({"train": []}, protocol=protocol)
    if kind == "deep":  # a list nested 100000 deep where a path string was: a few hundred kilobytes of pickle
        depth = 100_000
        placeholder = b"X" + len(DEEP_PLACEHOLDER).to_bytes(4, "little") + DEEP_PLACEHOLDER.encode()
        data = data.replace(placeholder, b"]" * depth + b"a" * (depth - 1))
    return Blob(draw(byte_mutated(data)) if draw(st.integers(0, 3)) == 0 else data)


# ---------------------------------------------------------------------------------------------- the command line
class Reached(Exception):
    """Raised by a stand-in for the real work (caching, training, the demo): the arguments were accepted."""


NUMBERISH = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "1", "2", "16", "1,,2", ",", "1,2,", "1.5", "nan", "inf", "-inf", "1e309",
                     "99999999999999999999", "0x10", "abc", "none", "None", "true", "-", "1 2", "+1", "٣", "\udcff"]),
    st.integers(-(10**6), 10**6).map(str),
    st.text(max_size=10),
)  # fmt: skip
LISTS = st.lists(NUMBERISH, min_size=1, max_size=3).map(",".join) | NUMBERISH
DEVICES = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7", "banana", "", "CPU", "mps", "meta", "cpu:1", "cuda:-1"])


def choice_or_text(values):
    return st.sampled_from(values) | st.text(max_size=10)


@st.composite
def options(draw, table):
    """A random subset of `table`'s options, each with a drawn value (None: a flag)."""
    args = []
    for option in draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=5)):
        value = table[option]
        args += [option] if value is None else [option, draw(value)]
    return args


@st.composite
def train_args(draw, paths):
    methods = st.lists(st.sampled_from([*METHODS, "cop", "", "PROGRAD", " kd"]), min_size=1, max_size=3)
    table = {
        "--methods": methods.map(",".join) | st.text(max_size=10), "--shots": LISTS, "--seeds": LISTS,
        "--lambda": LISTS, "--alpha": LISTS, "--setting": choice_or_text(["fewshot", "base2new", "Fewshot"]),
        "--epochs": NUMBERISH, "--batch-size": NUMBERISH, "--n-ctx": NUMBERISH, "--eval-every": NUMBERISH,
        "--init": choice_or_text(["template", "random", "zeros"]),
        "--position": choice_or_text(["end", "middle", "front", "back"]), "--lr": NUMBERISH,
        "--temperature": NUMBERISH, "--lambda-policy": choice_or_text(["release", "paper"]),
        "--precision": choice_or_text(["fp32", "bf16", "fp16", "fp8"]), "--device": DEVICES,
        "--class-chunk": NUMBERISH, "--checkpoint-minutes": NUMBERISH, "--class-specific": None,
        "--quick-gelu": None, "--sweep": st.sampled_from(paths["sweeps"]),
    }  # fmt: skip
    cache = draw(st.sampled_from(paths["caches"]))
    return ["train", "--cache", cache, "--out", paths["out"], *draw(options(table)), "--dry-run", "--no-progress"]


@st.composite
def cache_args(draw, paths):
    table = {
        "--root": st.sampled_from(paths["roots"]), "--shots": LISTS, "--seeds": LISTS, "--views": NUMBERISH,
        "--dtype": choice_or_text(["fp16", "fp32", "float16", "bf16"]), "--device": DEVICES,
        "--shard-size": st.sampled_from(["1000", "64MB", "0", "-1", "1.5GB", "", "abc", "1e3", "9" * 30 + "GB"]),
        "--precision": choice_or_text(["auto", "fp32", "fp16", "bf16", "fp8"]), "--batch-size": NUMBERISH,
        "--num-workers": NUMBERISH, "--augmentation-seed": NUMBERISH,
        "--model": st.sampled_from(["fastprompt-tiny", "RN51", "", "../../x", "fastprompt-tiny "]),
        "--pretrained": st.sampled_from(["none", "None", "nope-tag", *paths["checkpoints"]]), "--fewshot-pkl": None,
        "--full-train": None, "--manifest": st.sampled_from(paths["manifests"]),
        "--classnames": st.sampled_from(paths["manifests"]), "--name": st.text(max_size=12), "--quick-gelu": None,
    }  # fmt: skip
    data = {  # each dataset with where it lies, so that most commands get past reading the data
        "FuzzCli": ["--root", paths["roots"][0]], "imagefolder": ["--root", paths["roots"][1]],
        "manifest": ["--manifest", paths["manifests"][0]],
    }  # fmt: skip
    dataset = draw(st.sampled_from([*data] * 3 + ["OxfordPets", "Pets", "", "../x"]))
    return ["cache", dataset, *data.get(dataset, []), "--out", paths["out"], "--pretrained", "none", "--model",
            "fastprompt-tiny", *draw(options(table)), "--no-progress"]  # fmt: skip


@st.composite
def other_args(draw, paths):
    command = draw(st.sampled_from(["demo", "report", "testbed build", "testbed pretrain", "top-level"]))
    if command == "demo":
        table = {"--shots": LISTS, "--seeds": LISTS, "--epochs": NUMBERISH, "--threads": NUMBERISH, "--quick": None}
        return ["demo", "--out", paths["out"], *draw(options(table)), "--no-progress", "--no-plots"]
    if command == "report":
        return ["report", draw(st.sampled_from(paths["sweep_dirs"])), "--no-plots", "--out", paths["out"]]
    if command == "testbed build":
        table = {
            "--task": choice_or_text(["shapes", "Shapes", ""]),
            "--seed": NUMBERISH,
            "--train-per-class": NUMBERISH,
            "--val-per-class": NUMBERISH,
            "--test-per-class": NUMBERISH,
        }
        return ["testbed", "build", "--out", paths["out"], *draw(options(table))]
    if command == "testbed pretrain":
        table = {
            "--steps": NUMBERISH,
            "--batch-size": NUMBERISH,
            "--pool-size": NUMBERISH,
            "--lr": NUMBERISH,
            "--eval-every": NUMBERISH,
            "--max-minutes": NUMBERISH,
            "--threads": NUMBERISH,
        }
        return ["testbed", "pretrain", "--out", paths["out"] + "/x.safetensors", *draw(options(table))]
    tokens = st.sampled_from(["train", "trian", "cache", "--help", "--version", "-x", "", "env", "testbed", "--"])
    return draw(st.lists(tokens | st.text(max_size=6), max_size=3))


def check_cli(app, args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, Reached):
        return "accepted"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"fastprompt {args!r} raised {result.exception!r}:\n{trace}")
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return "ok"
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    if errors:
        assert len(errors) == 1 and lines[-1] == errors[0], result.output
        assert_one_sentence(errors[0].removeprefix("Error: "))
        return "error"
    assert "Usage:" in result.output, result.output
    return "usage"


# ---------------------------------------------------------------------------------------------- the workspace
def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tiny_cache(root: Path) -> Path:
    """A real feature cache: 2 classes, 1- and 2-shot subsets of seeds 1 and 2 (a few seconds with the tiny model)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for name in ("cat", "dog"):
            for index in range(count):
                image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                image.save(_touch(root / "own" / split / name / f"{index}.png"))
    args = ["cache", "imagefolder", "--root", str(root / "own"), "--out", str(root / "cache"), "--model",
            "fastprompt-tiny", "--pretrained", "none", "--shots", "1,2", "--seeds", "1,2", "--views", "1",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    return root / "cache"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Folders the checks write their fuzzed files into, and the fixed data the command-line fuzzing points at."""
    root = tmp_path_factory.mktemp("fuzz")
    register_dataset("FuzzSplit", "fuzz_split", "images", replace=True)
    register_dataset("FuzzPkl", "fuzz_pkl", "images", replace=True)
    register_dataset("FuzzCli", "fuzz_cli", "images", replace=True)
    (root / "splits" / "fuzz_split").mkdir(parents=True)
    for wnid in ("n01", "n02", "n03"):
        for folder in ("imagenet/images/train", "imagenet/images/val", "imagenet-adversarial/imagenet-a"):
            _touch(root / "imagenet_root" / folder / wnid / "a.jpg")
    for label in range(3):
        _touch(root / "imagenet_root" / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpg")
    (root / "fgvc" / "fgvc_aircraft").mkdir(parents=True)
    (root / "manifests").mkdir()
    rows = [[f"c{label}/{split}.jpg", label, f"class_{label}"] for label in range(2) for split in SPLITS]
    _touch(root / "cli_data" / "fuzz_cli" / "split_zhou_FuzzCli.json",
           json.dumps({split: [row for row in rows if split in row[0]] for split in SPLITS}).encode())  # fmt: skip
    for split in SPLITS:
        for name in ("cat", "dog"):
            _touch(root / "cli_images" / split / name / "0.png")
    files = {
        "manifest": _touch(root / "cli_files" / "list.csv", b"path,label,split,classname\na.jpg,0,train,cat\n"),
        "garbage": _touch(root / "cli_files" / "garbage.jsonl", b"\xff\xfe{not json\n"),
        "sweep": _touch(root / "cli_files" / "sweep.toml", b'[sweep]\nmethods = ["coop"]\n[fixed]\nepochs = 2\n'),
        "bad_sweep": _touch(root / "cli_files" / "bad.yaml", b"sweep: [\n"),
        "odd_sweep": _touch(root / "cli_files" / "sweep.ini", b"[sweep]\n"),
        "checkpoint": _touch(root / "cli_files" / "weights.pt", os.urandom(64)),
        "results": _touch(root / "sweep_garbage" / "results.jsonl", b'{"run_id": 1}\nnot json\n'),
    }
    missing = str(root / "missing")
    empty = root / "empty"
    empty.mkdir()
    odd = [str(root / ("x" * 300)), str(root / "new\nline"), ""]  # a name over the file system's limit; a newline
    paths = {
        "out": str(root / "out"),
        "caches": [missing, str(files["manifest"]), str(empty), *odd],
        "sweeps": [str(files[key]) for key in ("sweep", "bad_sweep", "odd_sweep", "garbage")] + [missing, *odd],
        "roots": [str(root / "cli_data"), str(root / "cli_images"), missing, str(files["manifest"]), *odd],
        "manifests": [str(files["manifest"]), str(files["garbage"]), missing, str(empty), *odd],
        "checkpoints": [str(files["checkpoint"]), missing, *odd],
        "sweep_dirs": [missing, str(empty), str(files["manifest"]), str(root / "sweep_garbage"), *odd],
    }
    return types.SimpleNamespace(root=root, paths=paths, cache=None)


@pytest.fixture
def cli(workspace, monkeypatch):
    """The app, with the real work replaced by `Reached` after checking that only valid arguments got there."""
    import fastprompt.cache.extract
    import fastprompt.cache.network
    import fastprompt.demo
    import fastprompt.testbed
    import fastprompt.testbed.pretrain
    import fastprompt.train.sweep

    if workspace.cache is None:  # built before the real work is replaced
        workspace.cache = str(_tiny_cache(workspace.root / "tiny"))
        workspace.paths["caches"] = [workspace.cache] * 4 + workspace.paths["caches"]

    def build_cache(dataset, clip, out, options, subsets, device="cpu", precision="auto", batch_size=256,
                    num_workers=4, progress=True):  # fmt: skip
        assert device in ("cpu", "cuda") or device.startswith("cuda:"), device
        assert precision in ("auto", "fp32", "fp16", "bf16") and batch_size >= 1 and num_workers >= 0
        assert all(shots >= 1 for shots in options.shots) and dataset.classnames
        raise Reached

    def run_demo(options, echo=print):
        assert all(shots >= 1 for shots in options.shots) and options.seeds
        assert (options.epochs is None or options.epochs >= 1) and options.threads >= 1
        raise Reached

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(fastprompt.cache.extract, "build_cache", build_cache)
    monkeypatch.setattr(fastprompt.demo, "run_demo", run_demo)
    monkeypatch.setattr(fastprompt.testbed, "build_testbed", stop)
    monkeypatch.setattr(fastprompt.testbed.pretrain, "pretrain", stop)
    monkeypatch.setattr(fastprompt.train.sweep, "run_sweep", stop)
    monkeypatch.setattr(fastprompt.cache.network, "load_cache_clip", stop)
    return load_commands()


# ---------------------------------------------------------------------------------------------- the checks
def check_split_file(workspace, data: bytes) -> str:
    (workspace.root / "splits" / "fuzz_split" / "split_zhou_FuzzSplit.json").write_bytes(data)
    outcome, dataset = read_or_one_sentence(load_dataset, "FuzzSplit", workspace.root / "splits")
    if dataset is not None:
        assert_dataset(dataset, contained=True)
    return outcome


def check_manifest(workspace, case) -> str:
    suffix, manifest, names, with_root = case
    path = _touch(workspace.root / "manifests" / f"list{suffix}", manifest)
    names_path = _touch(workspace.root / "manifests" / "names.txt", names) if names is not None else None
    root = workspace.root / "base" if with_root else None
    outcome, dataset = read_or_one_sentence(load_dataset, "manifest", root, manifest=path, classnames_file=names_path)
    path.unlink()
    if dataset is not None:
        assert_dataset(dataset, contained=False)
    return outcome


def check_classnames_file(workspace, data: bytes) -> str:
    manifest = _touch(
        workspace.root / "manifests" / "fixed.jsonl",
        b"".join(b'{"path": "a%d.jpg", "label": %d, "split": "train"}\n' % (i, i) for i in range(3)),
    )
    names = _touch(workspace.root / "manifests" / "names.txt", data)
    outcome, dataset = read_or_one_sentence(load_dataset, "manifest", None, manifest=manifest, classnames_file=names)
    if dataset is not None:
        assert_dataset(dataset, contained=False)
        assert len(dataset.classnames) >= 3
    return outcome


def check_imagenet_classnames(workspace, case) -> str:
    name, data = case
    root = workspace.root / "imagenet_root"
    for folder in ("imagenet", "imagenet-adversarial", "imagenetv2"):
        (root / folder / "classnames.txt").write_bytes(data)
    outcome, dataset = read_or_one_sentence(load_dataset, name, root)
    if dataset is not None:
        assert_dataset(dataset, contained=True)
    return outcome


def check_fgvc(workspace, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        (workspace.root / "fgvc" / "fgvc_aircraft" / name).write_bytes(data)
    outcome, dataset = read_or_one_sentence(load_dataset, "FGVCAircraft", workspace.root / "fgvc")
    if dataset is not None:
        assert_dataset(dataset, contained=True)
    return outcome


def _sweep_runs(path: Path) -> list[RunConfig]:
    """What `fastprompt train --sweep` does with the file: its axes and fixed values over the command's."""
    file_axes, file_fixed = load_sweep_file(path)
    axes = {"method": ["coop"], "shots": [1], "seed": [1], **file_axes}
    return expand_sweep(axes, {"dataset": "OxfordPets", **file_fixed})


def check_sweep_file(workspace, case) -> str:
    suffix, data = case
    path = _touch(workspace.root / "sweeps" / f"sweep{suffix}", data)
    outcome, runs = read_or_one_sentence(_sweep_runs, path)
    path.unlink()
    if runs is not None:
        for config in runs:
            assert resolve(config) == config
            for field in fields(RunConfig):
                value = getattr(config, field.name)
                if isinstance(value, float):
                    assert math.isfinite(value), (field.name, value)
            assert config.shots >= 1 and config.epochs >= 1 and isinstance(config.seed, int)
    return outcome


def check_pickle(workspace, data: bytes) -> str:
    path = _touch(workspace.root / "fuzz_pkl" / "split_fewshot" / "shot_1-seed_1.pkl", data)
    image_root = workspace.root / "fuzz_pkl" / "images"
    outcome, subsets = read_or_one_sentence(import_fewshot_pkl, path, get_dataset_spec("FuzzPkl"), image_root)
    assert FORBIDDEN_CALLS["called"] == 0, "a global outside the allow-list was called"
    assert NEVER_IMPORTED not in sys.modules and TOOLKIT_RECORD[0] not in sys.modules
    if subsets is not None:
        for item in [*subsets[0], *subsets[1]]:
            assert isinstance(item.key, str) and item.key and inside(item.path, image_root), item
            assert type(item.label) is int and item.label >= 0 and isinstance(item.classname, str), item
    return outcome


# ---------------------------------------------------------------------------------------------- the tests
def _formats(workspace):
    return {
        "split_file": (file_bytes(split_documents(), encode_json), lambda case: check_split_file(workspace, case)),
        "manifest": (manifest_cases(), lambda case: check_manifest(workspace, case)),
        "classnames_file": (file_bytes(classname_lists(), encode_lines),
                            lambda case: check_classnames_file(workspace, case)),
        "imagenet_classnames": (imagenet_cases(), lambda case: check_imagenet_classnames(workspace, case)),
        "fgvc_variants": (fgvc_cases(), lambda case: check_fgvc(workspace, case)),
        "sweep_file": (sweep_cases(), lambda case: check_sweep_file(workspace, case)),
        "fewshot_pickle": (pickle_cases(), lambda case: check_pickle(workspace, case)),
    }  # fmt: skip


@pytest.fixture
def guarded_unpickler(monkeypatch):
    """Counts every global the restricted unpickler resolves and checks it is one of the allow-list's objects."""
    allowed = list(pkl_import._ALLOWED.values())
    resolved = Counter()
    find_class = RestrictedUnpickler.find_class

    def checked_find_class(self, module, name):
        try:
            found = find_class(self, module, name)
        except pickle.UnpicklingError:
            resolved["refused (not on the allow-list)"] += 1
            raise
        assert any(found is value for value in allowed), f"{module}.{name} resolved to {found!r}"
        resolved[f"{module}.{name}"] += 1
        return found

    monkeypatch.setattr(RestrictedUnpickler, "find_class", checked_find_class)
    monkeypatch.setitem(sys.modules, FORBIDDEN_MODULE, types.ModuleType(FORBIDDEN_MODULE))
    sys.modules[FORBIDDEN_MODULE].target = _forbidden_target  # present: a lax unpickler would find and call it
    FORBIDDEN_CALLS.clear()
    return resolved


FILE_FORMATS = ["split_file", "manifest", "classnames_file", "imagenet_classnames", "fgvc_variants", "sweep_file",
                "fewshot_pickle"]  # fmt: skip
CLI_FORMATS = {"cli_train": train_args, "cli_cache": cache_args, "cli_other": other_args}


def _run_file_format(name, workspace, guarded_unpickler, examples):
    strategy, check = _formats(workspace)[name]
    fuzz(name, strategy, check, examples)
    if name == "fewshot_pickle":
        calls = FORBIDDEN_CALLS["called"]
        print(f"fuzz {name}: globals looked up: {dict(guarded_unpickler)}; forbidden calls made: {calls}")


@pytest.mark.parametrize("name", FILE_FORMATS)
def test_file_format_fuzz(name, workspace, guarded_unpickler):
    _run_file_format(name, workspace, guarded_unpickler, DEFAULT_EXAMPLES[name])


@pytest.mark.parametrize("name", sorted(CLI_FORMATS))
def test_cli_fuzz(name, workspace, cli):
    fuzz(name, CLI_FORMATS[name](workspace.paths), lambda args: check_cli(cli, args), DEFAULT_EXAMPLES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", FILE_FORMATS)
def test_file_format_fuzz_many(name, workspace, guarded_unpickler):
    _run_file_format(name, workspace, guarded_unpickler, SLOW_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLI_FORMATS))
def test_cli_fuzz_many(name, workspace, cli):
    fuzz(name, CLI_FORMATS[name](workspace.paths), lambda args: check_cli(cli, args), SLOW_EXAMPLES)
