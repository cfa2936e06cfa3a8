"""Loading a frozen CLIP: any open_clip model name with a pretrained tag, a local checkpoint, or random weights.

`load_clip` is part of the stable interface. Everything it returns is frozen (no parameter requires grad, eval mode),
so that every backward pass through it computes input gradients only (DESIGN.md item 4).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprompt.errors import FastPromptError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_MODEL = "fastprompt-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

log = logging.getLogger(__name__)


def register_model_configs() -> None:
    """Register fastprompt's own model configs (e.g. `fastprompt-tiny`) with open_clip, once."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)
    _registered = True


@dataclass
class Clip:
    """A frozen CLIP with what fastprompt needs around it.

    Attributes:
        model: the open_clip model (eval mode, frozen).
        tokenizer: open_clip's tokenizer for this model (callable: list[str] -> (B, context_length) int64).
        preprocess_train: open_clip's training transform (fastprompt's cache builds PROTOCOL.md's own).
        preprocess_val: open_clip's evaluation transform.
        name: the open_clip model name.
        pretrained: the pretrained tag, checkpoint path, or None for random weights.
        precision: "fp32", "bf16" or "fp16".
    """

    model: Any
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    name: str
    pretrained: str | None
    precision: str
    device: torch.device
    _checksum: str | None = field(default=None, repr=False)

    @property
    def preprocess_cfg(self) -> dict:
        """Image size, mean, std and interpolation that the image tower expects."""
        import open_clip

        cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        size = cfg.get("size", 224)
        cfg["size"] = size if isinstance(size, int) else int(size[0])
        cfg["mean"] = tuple(float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        cfg["std"] = tuple(float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD))
        cfg.setdefault("interpolation", "bicubic")
        return cfg

    @property
    def logit_scale(self) -> float:
        """The model's own learned logit scale, exp(logit_scale) (100 for the released CLIP weights)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def weights_checksum(self) -> str:
        """sha256 over every parameter and buffer (names, shapes, bytes): identifies the weights in a cache manifest."""
        if self._checksum is None:
            digest = hashlib.sha256()
            for key, value in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(str(tuple(value.shape)).encode())
                digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._checksum = digest.hexdigest()
        return self._checksum

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (B, embed_dim), not normalised."""
        return self.model.encode_image(images)


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\")) or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors")


def _check_model_name(name: str) -> None:
    import open_clip

    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FastPromptError(
            f"Unknown model name '{name}'.{hint} `python -c \"import open_clip; print(open_clip.list_models())\"` "
            f"lists them all; `{TINY_MODEL}` is fastprompt's tiny test model."
        )


def _check_pretrained(name: str, pretrained: str) -> str:
    """Return "file" or "tag" after checking that the file exists or that the tag is known for this model."""
    import open_clip

    if Path(pretrained).is_file():
        return "file"
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return "tag"
    if _looks_like_path(pretrained):
        raise FastPromptError(f"Checkpoint file '{pretrained}' does not exist; check the path.")
    listed = ", ".join(tags) if tags else "none"
    raise FastPromptError(
        f"'{pretrained}' is neither a pretrained tag of {name} (known tags: {listed}) nor an existing checkpoint file."
    )


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Clip:
    """Load a frozen open_clip model with its tokenizer and transforms.

    Args:
        name: an open_clip model name ("RN50", "ViT-B-16", "fastprompt-tiny", ...).
        pretrained: an open_clip pretrained tag ("openai"; downloaded by open_clip when online), a local checkpoint
            file (.pt, .bin, .safetensors; an OpenAI JIT archive works too), or None for random weights.
        device: where the model lives.
        precision: "fp32", "bf16" or "fp16" (weights cast as open_clip does it; layer norms keep their dtype rules).

    Returns:
        A `Clip` whose model is in eval mode with no parameter requiring grad.

    Raises:
        FastPromptError: unknown model or tag, missing file, a checkpoint that does not fit the architecture, or a
            download that failed (offline).
    """
    import open_clip

    if precision not in PRECISIONS:
        raise FastPromptError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    _check_model_name(name)
    kind = _check_pretrained(name, pretrained) if pretrained else None
    try:
        with _offline_unless_reachable(kind == "tag"):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision
            )
    except FileNotFoundError as error:
        raise FastPromptError(f"Could not read checkpoint '{pretrained}': {error}") from None
    except Exception as error:  # open_clip reports misfits and failed downloads with several exception types
        if kind == "file":
            detail = " ".join(line.strip() for line in str(error).strip().splitlines()[:3])[:300]
            raise FastPromptError(
                f"Checkpoint '{pretrained}' does not fit the {name} architecture ({type(error).__name__}: {detail}); "
                f"pass the model name it was trained with."
            ) from None
        if kind == "tag":
            raise _download_error(name, pretrained, error) from None
        raise
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    return Clip(
        model=model,
        tokenizer=tokenizer,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        name=name,
        pretrained=pretrained,
        precision=precision,
        device=torch.device(device),
    )


@contextlib.contextmanager
def _offline_unless_reachable(needs_hub: bool, host: str = "huggingface.co", timeout_s: float = 3.0):
    """Put huggingface_hub in offline mode (cached files still load) when the hub cannot be reached.

    Without this, an offline machine spends most of a minute in the hub client's retries before failing.
    """
    if not needs_hub:
        yield
        return
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _download_error(name: str, tag: str, error: Exception) -> FastPromptError:
    return FastPromptError(
        f"Could not fetch the '{tag}' weights of {name} ({type(error).__name__}: {str(error)[:160]}); this machine "
        f"may be offline. Download the checkpoint on a connected machine and pass its path instead, e.g. "
        f"`--pretrained /path/to/{name}.pt` (or `load_clip('{name}', pretrained='/path/to/{name}.pt')`)."
    )
