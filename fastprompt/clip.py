"""Loading a frozen CLIP: any open_clip model name with a pretrained tag, a local checkpoint, or random weights.

`load_clip` is part of the stable interface. Everything it returns is frozen (no parameter requires grad, eval mode),
so that every backward pass through it computes input gradients only (DESIGN.md item 4).

It builds the network the weights were trained with (PROTOCOL.md section 6b, docs/models.md). OpenAI's CLIP weights
were trained with QuickGELU (x * sigmoid(1.702 x)) where open_clip's plain configs ("RN50", "ViT-B-16") have nn.GELU,
and the state dict does not say which. The activation is decided, first rule that applies:
1. a pretrained tag: open_clip's pretrained config for that tag (`quick_gelu`), which an explicit option must not
   contradict;
2. a model config that sets `quick_gelu` (the `-quickgelu` names): QuickGELU;
3. the explicit option (`quick_gelu=True/False`, `--quick-gelu/--no-quick-gelu`);
4. a TorchScript archive (OpenAI's release format): the activation its code holds;
5. random weights, or a checkpoint for an architecture without QuickGELU-trained weights in open_clip's pretrained
   list (e.g. `fastprompt-tiny`): the model config's;
6. otherwise (a plain state dict for e.g. RN50 or ViT-B-16) the checkpoint is ambiguous and refused.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprompt.errors import FastPromptError, brief

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_MODEL = "fastprompt-tiny"
QUICK_GELU_SUFFIX = "-quickgelu"
# The entries of `Clip.architecture` that change the function the network computes (compared against a cache's record)
ARCHITECTURE_KEYS = ("quick_gelu", "text_activation", "image_activation")
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
        architecture: the network as built: `model` (open_clip config name), `force_quick_gelu` (the flag given to
            open_clip), `quick_gelu` (bool), `text_activation` and `image_activation` (the MLP activation found in
            each tower's transformer: "quick_gelu", "gelu", or None for a tower without one, e.g. a ResNet) and
            `rule` (what decided the activation; module docstring).
    """

    model: Any
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    name: str
    pretrained: str | None
    precision: str
    device: torch.device
    architecture: dict = field(default_factory=dict)
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
            f'Unknown model name {brief(name)}.{hint} `python -c "import open_clip; print(open_clip.list_models())"` '
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
        f"{brief(pretrained)} is neither a pretrained tag of {name} (known tags: {listed}) nor an existing checkpoint "
        f"file."
    )


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
) -> Clip:
    """Load a frozen open_clip model with its tokenizer and transforms, as the network its weights were trained with.

    Args:
        name: an open_clip model name ("RN50", "ViT-B-16", "RN50-quickgelu", "fastprompt-tiny", ...).
        pretrained: an open_clip pretrained tag ("openai"; downloaded by open_clip when online), a local checkpoint
            file (.pt, .bin, .safetensors, or a TorchScript archive as OpenAI distributes them), or None for random
            weights.
        device: where the model lives.
        precision: "fp32", "bf16" or "fp16" (weights cast as open_clip does it; layer norms keep their dtype rules).
        quick_gelu: build the text (and ViT image) transformer with QuickGELU (True) or nn.GELU (False); None decides
            by the rules of the module docstring. Needed for a plain state dict of an architecture that has weights
            trained either way (e.g. RN50, ViT-B-16).

    Returns:
        A `Clip` whose model is in eval mode with no parameter requiring grad; `clip.architecture` says what was built.

    Raises:
        FastPromptError: unknown model or tag, missing file, a checkpoint that does not fit the architecture or does
            not say which activation it was trained with, an option contradicting the tag or the model name, or a
            download that failed (offline).
    """
    import open_clip

    if precision not in PRECISIONS:
        raise FastPromptError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    _check_model_name(name)
    kind = _check_pretrained(name, pretrained) if pretrained else None
    archive = kind == "file" and _is_torchscript_archive(pretrained)
    use_quick_gelu, rule = resolve_quick_gelu(name, pretrained, quick_gelu, kind)
    force_quick_gelu = use_quick_gelu and not config_quick_gelu(name)
    try:
        with _offline_unless_reachable(kind == "tag"), _quiet_random_init_warning(archive):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name,
                pretrained=None if archive else pretrained,
                device=device,
                precision=precision,
                force_quick_gelu=force_quick_gelu,
            )
            if archive:
                model.load_state_dict(_torchscript_state_dict(pretrained))
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
    architecture = _architecture(model, name, use_quick_gelu, force_quick_gelu, rule)
    built = architecture["text_activation"]
    if built in ("quick_gelu", "gelu") and (built == "quick_gelu") != use_quick_gelu:
        raise FastPromptError(
            f"open_clip built {name} with {_ACTIVATION_NAMES[built]} although {rule} asks for "
            f"{_ACTIVATION_NAMES['quick_gelu' if use_quick_gelu else 'gelu']}; pass the model name or quick_gelu "
            f"option that matches the weights."
        )
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
        architecture=architecture,
    )


_ACTIVATION_NAMES = {"quick_gelu": "QuickGELU", "gelu": "GELU"}


def _option(value: bool) -> str:
    return f"quick_gelu={value} (`--{'' if value else 'no-'}quick-gelu`)"


def config_quick_gelu(name: str) -> bool:
    """Whether open_clip's config `name` itself sets QuickGELU (the `-quickgelu` names do); False for unknown names."""
    import open_clip

    register_model_configs()
    config = open_clip.get_model_config(name) or {}
    return bool(config.get("quick_gelu", False))


def is_pretrained_tag(name: str, pretrained: str | None) -> bool:
    """True when `pretrained` is one of open_clip's pretrained tags of `name` (and not an existing file)."""
    import open_clip

    if not pretrained or Path(pretrained).is_file():
        return False
    return pretrained in open_clip.list_pretrained_tags_by_model(name)


def resolve_quick_gelu(
    name: str, pretrained: str | None, quick_gelu: bool | None = None, kind: str | None = None
) -> tuple[bool, str]:
    """Whether `name` with `pretrained` is built with QuickGELU, and the rule that decided it (module docstring).

    Args:
        name: an open_clip model name.
        pretrained: a pretrained tag, a checkpoint file, or None (random weights).
        quick_gelu: the explicit option, or None.
        kind: "tag", "file" or None when already known (else worked out from `pretrained`).

    Raises:
        FastPromptError: the option contradicts the tag or the model name, or a checkpoint file cannot be told.
    """
    import open_clip

    if kind is None and pretrained:
        kind = "tag" if is_pretrained_tag(name, pretrained) else "file"
    named = config_quick_gelu(name)
    if kind == "tag":
        trained = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        if quick_gelu is not None and quick_gelu != trained:
            raise FastPromptError(
                f"The '{pretrained}' weights of {name} were trained with "
                f"{_ACTIVATION_NAMES['quick_gelu' if trained else 'gelu']}, which {_option(quick_gelu)} contradicts; "
                f"leave the option unset for a pretrained tag."
            )
        return trained, f"the pretrained config of tag '{pretrained}'"
    if named:
        if quick_gelu is False:
            plain = name[: -len(QUICK_GELU_SUFFIX)] if name.endswith(QUICK_GELU_SUFFIX) else "the plain config"
            raise FastPromptError(
                f"{name} is the QuickGELU variant of its architecture, which {_option(False)} contradicts; use "
                f"{plain} for weights trained with GELU."
            )
        return True, f"the model config {name}"
    if quick_gelu is not None:
        return quick_gelu, f"the option {_option(quick_gelu)}"
    if kind == "file":
        activation = _torchscript_activation(pretrained)
        if activation is not None:
            return activation == "quick_gelu", "the code of the TorchScript archive"
        trained_with_quick_gelu = [
            tag
            for tag in open_clip.list_pretrained_tags_by_model(name)
            if open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
        ]
        if trained_with_quick_gelu:
            raise FastPromptError(
                f"Checkpoint '{pretrained}' does not say whether its {name} weights were trained with QuickGELU (like "
                f"open_clip's tags {', '.join(trained_with_quick_gelu[:3])}) or GELU: pass {_option(True)}, or the "
                f"model name {name}{QUICK_GELU_SUFFIX}, for QuickGELU-trained weights such as OpenAI's, or "
                f"{_option(False)} for weights trained with open_clip's plain {name} config."
            )
    return False, f"the model config {name}"


def _is_torchscript_archive(path: str) -> bool:
    """A TorchScript archive (OpenAI's released .pt files): a zip with code/ and constants.pkl, unlike torch.save's."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def _torchscript_activation(path: str) -> str | None:
    """The activation a TorchScript archive's code uses ("quick_gelu" or "gelu"); None for other files or neither.

    OpenAI's archives keep their module classes by name (`QuickGELU`) and, traced, the constant 1.702 in the code.
    """
    if not _is_torchscript_archive(path):
        return None
    with zipfile.ZipFile(path) as archive:
        code = b"".join(
            archive.read(entry) for entry in archive.namelist() if "/code/" in entry or entry.endswith("data.pkl")
        )
    if b"QuickGELU" in code or b"1.702" in code:
        return "quick_gelu"
    if b"gelu" in code:
        return "gelu"
    return None


def _torchscript_state_dict(path: str) -> dict:
    """The weights of a TorchScript archive (torch.load refuses these archives with weights_only=True)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; it still reads OpenAI's files
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives carry these as buffers
        state_dict.pop(key, None)
    return state_dict


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns of random weights when the model is built before the archive's weights are loaded into it."""
    if not active:
        yield
        return
    root, log_filter = logging.getLogger(), _RandomInitFilter()
    root.addFilter(log_filter)
    try:
        yield
    finally:
        root.removeFilter(log_filter)


def _activation_of(module) -> str | None:
    """The first transformer-MLP activation in `module`: "quick_gelu", "gelu" (or "gelu_tanh"), or None."""
    from open_clip.transformer import QuickGELU

    if module is None:
        return None
    for submodule in module.modules():
        if isinstance(submodule, QuickGELU):
            return "quick_gelu"
        if isinstance(submodule, torch.nn.GELU):
            return "gelu" if submodule.approximate == "none" else f"gelu_{submodule.approximate}"
    return None


def _architecture(model, name: str, quick_gelu: bool, force_quick_gelu: bool, rule: str) -> dict:
    text_tower = getattr(model, "text", None) or getattr(model, "transformer", None)
    return {
        "model": name,
        "force_quick_gelu": force_quick_gelu,
        "quick_gelu": quick_gelu,
        "text_activation": _activation_of(text_tower),
        "image_activation": _activation_of(getattr(model, "visual", None)),
        "rule": rule,
    }


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
