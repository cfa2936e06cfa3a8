"""The memory model of a training step and `--class-chunk auto` (fastprompt/train/memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.errors import FastPromptError
from fastprompt.train import memory
from fastprompt.train.memory import auto_class_chunk, parse_class_chunk, safety, step_memory

NAMES = ["abyssinian", "basset hound", "great pyrenees", "sphynx", "yorkshire terrier", "pug", "samoyed", "beagle",
         "american pit bull terrier", "keeshond", "staffordshire bull terrier"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


def saved_bytes(encoder: PromptEncoder, ctx: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `encoder(ctx)` (the frozen weights aside)."""
    weights = {tensor.untyped_storage().data_ptr() for tensor in encoder.tower.transformer.parameters()}
    weights.add(encoder.tower.positional_embedding.untyped_storage().data_ptr())
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        encoder(ctx.detach().requires_grad_(True))
    return sum(kept.values())


@pytest.mark.parametrize("runs", [1, 3])
@pytest.mark.parametrize("class_specific", [False, True], ids=["shared_prefix", "truncated"])
def test_model_bounds_the_saved_activations(tiny, runs, class_specific):
    """The model's saved part is at least what autograd keeps, and not far above it (it sizes the chunk)."""
    encoder = PromptEncoder(tiny, NAMES, n_ctx=4, class_specific=class_specific, prompt_prefix=None)
    shape = (runs, len(NAMES), 4, encoder.width) if class_specific else (runs, 4, encoder.width)
    counted = saved_bytes(encoder, torch.randn(shape))
    predicted = step_memory(encoder, runs, len(NAMES)).saved
    assert counted <= predicted <= 1.6 * counted, f"{encoder.path}: predicted {predicted} B, counted {counted} B"


def test_model_grows_with_runs_and_chunk(tiny):
    encoder = PromptEncoder(tiny, NAMES, n_ctx=16, prompt_prefix="a photo of a")
    small, large = step_memory(encoder, 2, 3), step_memory(encoder, 2, len(NAMES))
    assert 0 < small.saved < large.saved and small.fixed == large.fixed
    assert step_memory(encoder, 4, 3).total > small.total
    assert step_memory(encoder, 2, 1000).chunk == len(NAMES)  # a chunk beyond K is all classes


def test_auto_chunk_within_bounds_for_faked_free_memory(tiny, monkeypatch):
    encoder = PromptEncoder(tiny, NAMES, n_ctx=16, prompt_prefix="a photo of a")
    k, runs = len(NAMES), 3

    def need(chunk):
        return safety(encoder.device) * step_memory(encoder, runs, chunk).total

    assert auto_class_chunk(encoder, runs, free_bytes=int(need(k)) + 1) is None  # all classes fit: no chunking
    free = int(need(4)) + 1
    monkeypatch.setattr(memory, "free_memory", lambda device: free)  # what the engine would read from the device
    chunk = auto_class_chunk(encoder, runs)
    assert 4 <= chunk < k and need(chunk) <= free < need(chunk + 1)
    with pytest.warns(UserWarning, match="even one class per chunk"):
        assert auto_class_chunk(encoder, runs, free_bytes=int(need(1)) - 1) == 1


def test_free_memory_reads_this_machine():
    assert memory.available_ram() > 0 and memory.free_memory("cpu") == memory.available_ram()
    with pytest.raises(FastPromptError, match="pass a number"):
        memory.free_memory("meta")


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", "auto"), ("AUTO", "auto"), ("250", 250), (7, 7)])
def test_parse_class_chunk(value, expected):
    assert parse_class_chunk(value) == expected


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5", 0])
def test_parse_class_chunk_refuses(value):
    with pytest.raises(FastPromptError, match="positive number of classes or 'auto'"):
        parse_class_chunk(value)


def test_cli_refuses_a_bad_class_chunk(tmp_path):
    app = load_commands()
    result = CliRunner().invoke(app, ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--class-chunk", "lots"])  # fmt: skip
    assert result.exit_code != 0
    assert "--class-chunk must be a positive number of classes or 'auto'" in result.output + str(result.exception)


PAGE_FAULTS = """
import resource, sys, torch
from fastprompt.train.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):  # a step's activations: two blocks above glibc's 32 MiB mmap threshold, freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    first, second = torch.ones(64 << 18), torch.ones(48 << 18)
    del first, second
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[-3:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_kept_freed_memory_is_reused_without_page_faults():
    """`fastprompt train` on the CPU keeps freed memory (bench/results/README.md, train_step.csv): a step's large
    activations are then reused by the next step instead of faulting in fresh pages at every step."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    results = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        kept, faults = done.stdout.split()
        results[mode] = (kept == "True", int(faults))
    assert results["keep"][0] and not results["default"][0]
    assert results["default"][1] > 3 * 20_000, "the default allocator should fault the blocks in at every step"
    assert results["keep"][1] < results["default"][1] / 100
