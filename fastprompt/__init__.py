"""fastprompt: fast, exact prompt tuning of CLIP (CoOp, ProGrad and relatives) on cached image features."""

from __future__ import annotations

__version__ = "0.1.0"


def _source_tree_subpackages() -> None:
    """Run from a source tree without installing (PYTHONPATH=., as bench/gpu_check.sh does on a bare machine): the
    top-level kernels/ and cli/ folders are `fastprompt.kernels` and `fastprompt.cli` there too (pyproject.toml maps
    them so when installed, and then this does nothing)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "kernels" / "prograd_update.py").is_file() and importlib.util.find_spec(f"{__name__}.kernels") is None:
        __path__.append(str(root))


_source_tree_subpackages()

from fastprompt.cache.loader import FeatureCache  # noqa: E402
from fastprompt.clip import Clip, load_clip  # noqa: E402
from fastprompt.data import register_dataset, sample_fewshot, split_base_new  # noqa: E402
from fastprompt.encoder import PromptEncoder  # noqa: E402
from fastprompt.errors import FastPromptError  # noqa: E402
from fastprompt.zeroshot import zero_shot_accuracy, zero_shot_weights  # noqa: E402

__all__ = [
    "Clip",
    "FastPromptError",
    "FeatureCache",
    "PromptEncoder",
    "__version__",
    "load_clip",
    "register_dataset",
    "sample_fewshot",
    "split_base_new",
    "zero_shot_accuracy",
    "zero_shot_weights",
]
