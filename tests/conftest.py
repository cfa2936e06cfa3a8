"""Suite-wide fixtures and tiers: the default run is CPU only; `gpu` tests skip without CUDA, `slow` without
--runslow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import the shared `numerics` helper

pytest_plugins = ["skip_policy", "pytester"]  # CI fails on skips other than the gpu/slow tiers

os.environ.setdefault("TRITON_INTERPRET", "1") if not torch.cuda.is_available() else None

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def clip_prompts():
    """The class names and templates of ../shared/data/clip_prompts.json (beside the checkout, and in CI)."""
    import json

    path = SHARED / "data" / "clip_prompts.json"
    if not path.exists():
        pytest.skip(f"{path} not found (it lies beside the checkout in ../shared)")
    return json.loads(path.read_text())["datasets"]
