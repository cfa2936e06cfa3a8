"""fastprompt: fast, exact prompt tuning of CLIP (CoOp, ProGrad and relatives) on cached image features."""

from __future__ import annotations

__version__ = "0.1.0"

from fastprompt.clip import Clip, load_clip  # noqa: E402
from fastprompt.errors import FastPromptError  # noqa: E402

__all__ = ["Clip", "FastPromptError", "load_clip", "__version__"]
