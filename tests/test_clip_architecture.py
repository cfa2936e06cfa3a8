"""Which network `load_clip` builds (QuickGELU or GELU), what the cache records, and what `train` accepts.

The rules (fastprompt/clip.py, docs/models.md) are exercised on tiny models: fastprompt-tiny (a ViT) and a tiny ResNet
registered here, with pretrained tags registered the way open_clip lists its own (`quick_gelu` in the tag's config)
and open_clip's download replaced by a local file. tests/test_clip_oracle.py checks the real RN50 and ViT-B-16 with
the `openai` tag against OpenAI's code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from fastprompt.cli.app import load_commands
from open_clip.transformer import QuickGELU
from PIL import Image
from typer.testing import CliRunner

import fastprompt.clip as clip_module
from fastprompt.cache.extract import model_record
from fastprompt.cache.network import load_cache_clip
from fastprompt.clip import config_quick_gelu, load_clip, register_model_configs, resolve_quick_gelu
from fastprompt.errors import FastPromptError
from fastprompt.testbed import load_testbed_clip

TINY = "fastprompt-tiny"
TINY_RESNET = "fastprompt-test-tiny-rn"
TAG_QUICK_GELU = {"quick": True, "plain": False}  # as open_clip lists OpenAI's weights and e.g. LAION's ViT-B-16


def one_sentence(message: str) -> bool:
    return message.endswith(".") and not re.search(r"[.!?]\s", message)


def text_activation(clip) -> type:
    return type(clip.model.transformer.resblocks[0].mlp.gelu)


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """Tags `quick` and `plain` for the tiny models (both "downloading" one local checkpoint), a tiny ResNet config and
    a `-quickgelu` variant of fastprompt-tiny; everything undone after the test."""
    register_model_configs()
    configs = open_clip.factory._MODEL_CONFIGS
    tiny_config = copy.deepcopy(configs[TINY])
    resnet_config = copy.deepcopy(tiny_config)
    resnet_config["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}
    monkeypatch.setitem(configs, TINY_RESNET, resnet_config)
    monkeypatch.setitem(configs, f"{TINY}-quickgelu", {**tiny_config, "quick_gelu": True})
    checkpoints = {}
    for name in (TINY, TINY_RESNET):
        torch.manual_seed(0)
        path = tmp_path / f"{name}.pt"
        torch.save(open_clip.create_model(name).state_dict(), path)
        tags = {tag: {"hf_hub": f"nowhere/{name}-{tag}/", "quick_gelu": quick} for tag, quick in TAG_QUICK_GELU.items()}
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, tags)
        checkpoints.update({cfg["hf_hub"]: path for cfg in tags.values()})

    def download(cfg, **kwargs):
        return str(checkpoints[cfg["hf_hub"]])

    monkeypatch.setattr(open_clip.factory, "download_pretrained", download)
    monkeypatch.setattr(clip_module, "_offline_unless_reachable", lambda needs_hub: contextlib.nullcontext())
    return SimpleNamespace(weights={path.stem: path for path in checkpoints.values()})


def test_a_tag_follows_its_pretrained_config(registry):
    quick = load_clip(TINY, "quick")
    assert quick.architecture["quick_gelu"] and text_activation(quick) is QuickGELU
    assert quick.architecture["text_activation"] == quick.architecture["image_activation"] == "quick_gelu"
    assert isinstance(quick.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # the ViT's image tower too
    assert "tag 'quick'" in quick.architecture["rule"]
    plain = load_clip(TINY, "plain")
    assert not plain.architecture["quick_gelu"] and text_activation(plain) is torch.nn.GELU
    assert load_clip(TINY, "quick", quick_gelu=True).architecture["quick_gelu"]  # agreeing is fine
    for tag, option in (("quick", False), ("plain", True)):
        with pytest.raises(FastPromptError, match="leave the option unset") as error:
            load_clip(TINY, tag, quick_gelu=option)
        assert one_sentence(str(error.value))


def test_the_real_openai_tags_say_quick_gelu():
    # what open_clip records for the paper's backbones (no weights needed to resolve the rule)
    for name in ("RN50", "RN101", "ViT-B-32", "ViT-B-16"):
        assert resolve_quick_gelu(name, "openai") == (True, "the pretrained config of tag 'openai'")
    assert resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")[0] is False
    assert resolve_quick_gelu("RN50", None) == (False, "the model config RN50")  # random weights: the config's
    assert config_quick_gelu("RN50-quickgelu") and not config_quick_gelu("RN50")


def test_a_plain_checkpoint_of_an_architecture_trained_both_ways_needs_the_option(registry):
    path = str(registry.weights[TINY])
    with pytest.raises(FastPromptError, match="does not say whether") as error:
        load_clip(TINY, path)
    message = str(error.value)
    assert one_sentence(message) and "--quick-gelu" in message and "--no-quick-gelu" in message
    quick = load_clip(TINY, path, quick_gelu=True)
    assert quick.architecture["quick_gelu"] and text_activation(quick) is QuickGELU
    plain = load_clip(TINY, path, quick_gelu=False)
    assert not plain.architecture["quick_gelu"] and text_activation(plain) is torch.nn.GELU
    assert quick.weights_checksum == plain.weights_checksum  # the weights cannot tell: hence the record


def test_a_quickgelu_name_is_explicit(registry):
    named = load_clip(f"{TINY}-quickgelu", str(registry.weights[TINY]))
    assert named.architecture["quick_gelu"] and text_activation(named) is QuickGELU
    assert not named.architecture["force_quick_gelu"]  # the config itself says so
    with pytest.raises(FastPromptError, match=f"use {TINY} for weights trained with GELU") as error:
        load_clip(f"{TINY}-quickgelu", None, quick_gelu=False)
    assert one_sentence(str(error.value))


def test_an_architecture_without_quick_gelu_weights_follows_its_config(tmp_path):
    # fastprompt-tiny has no published weights: its checkpoints (the testbed's) are the GELU network, no option needed
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(load_clip(TINY).model.state_dict(), path)
    assert load_clip(TINY, str(path)).architecture["quick_gelu"] is False
    shipped = load_testbed_clip()
    assert shipped.architecture["text_activation"] == "gelu"
    assert shipped.architecture["rule"] == f"the model config {TINY}"
    assert load_clip(TINY, str(path), quick_gelu=True).architecture["quick_gelu"]  # the option still applies


def test_openai_torchscript_archive_is_recognised_and_loaded(tmp_path):
    """OpenAI distributes its weights as traced TorchScript archives: QuickGELU, read from the archive's code."""
    from test_clip_oracle import import_openai_clip

    openai_clip = import_openai_clip()
    torch.manual_seed(0)
    # OpenAI's CLIP in fastprompt-tiny's shapes (embed 64, ViT 64 px / patch 16 / width 64 / 2 layers, text 64 x 2)
    theirs = openai_clip.model.CLIP(64, 64, 2, 64, 16, 77, 49408, 64, 2, 2).eval()
    tokens = openai_clip.tokenize(["a photo of a cat.", "a type of pet, a photo of a great pyrenees."])
    archive = tmp_path / "openai-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates tracing (OpenAI's files were made this way) and warns of it
        traced = torch.jit.trace_module(theirs, {"encode_text": (tokens,)})
    traced.save(str(archive))
    ours = load_clip(TINY, str(archive))
    assert ours.architecture["quick_gelu"] and ours.architecture["rule"] == "the code of the TorchScript archive"
    with torch.no_grad():
        expected = theirs.encode_text(tokens)
        assert torch.allclose(ours.model.encode_text(tokens), expected, rtol=1e-4, atol=1e-5)
    assert load_clip(TINY, str(archive), quick_gelu=False).architecture["quick_gelu"] is False  # the option wins


def test_the_manifest_records_the_architecture(registry):
    clip = load_clip(TINY, "quick")
    record = model_record(clip, "fp32")
    assert record["architecture"] == clip.architecture
    assert json.loads(json.dumps(record))["architecture"]["text_activation"] == "quick_gelu"


def _cache(record: dict, path="caches/toy") -> SimpleNamespace:
    return SimpleNamespace(manifest={"model": record}, path=Path(path))


def test_train_rebuilds_the_recorded_network(registry):
    # a checkpoint file cached with --quick-gelu: train needs no option, the record says it
    clip = load_clip(TINY, str(registry.weights[TINY]), quick_gelu=True)
    rebuilt = load_cache_clip(_cache(model_record(clip, "fp32")))
    assert rebuilt.architecture == clip.architecture and text_activation(rebuilt) is QuickGELU
    with pytest.raises(FastPromptError, match="drop --no-quick-gelu") as error:
        load_cache_clip(_cache(model_record(clip, "fp32")), quick_gelu=False)
    assert one_sentence(str(error.value))


def test_train_refuses_a_cache_of_another_network(registry):
    record = model_record(load_clip(TINY, "quick"), "fp32")
    record["architecture"].update(quick_gelu=False, text_activation="gelu", image_activation="gelu")  # e.g. older code
    with pytest.raises(FastPromptError, match="rebuild the cache") as error:
        load_cache_clip(_cache(record))
    message = str(error.value)
    assert one_sentence(message) and "made with the GELU network" in message and "QuickGELU" in message


def test_a_cache_without_the_record(registry):
    """Older caches hold features of open_clip's plain config: fine for a ResNet image tower, refused for a ViT."""
    resnet = model_record(load_clip(TINY_RESNET, "quick"), "fp32")
    del resnet["architecture"]
    clip = load_cache_clip(_cache(resnet))
    assert text_activation(clip) is QuickGELU and clip.architecture["image_activation"] is None
    vit = model_record(load_clip(TINY, "quick"), "fp32")
    del vit["architecture"]
    with pytest.raises(FastPromptError, match="predates") as error:
        load_cache_clip(_cache(vit))
    assert one_sentence(str(error.value))
    plain = model_record(load_clip(TINY, "plain"), "fp32")
    del plain["architecture"]
    assert load_cache_clip(_cache(plain)).architecture["quick_gelu"] is False  # as it was built then
    checkpoint = model_record(load_clip(TINY, str(registry.weights[TINY]), quick_gelu=False), "fp32")
    del checkpoint["architecture"]
    with pytest.raises(FastPromptError, match="does not say whether"):
        load_cache_clip(_cache(checkpoint))
    assert load_cache_clip(_cache(checkpoint), quick_gelu=False).architecture["quick_gelu"] is False


def _write_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(2):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_cli_options(registry, tmp_path):
    _write_imagefolder(tmp_path / "photos")
    runner, app = CliRunner(), load_commands()
    common = ["cache", "imagefolder", "--root", str(tmp_path / "photos"), "--name", "Photos", "--model", TINY,
              "--pretrained", str(registry.weights[TINY]), "--shots", "1", "--seeds", "1", "--views", "1",
              "--num-workers", "0", "--no-progress"]  # fmt: skip
    refused = runner.invoke(app, [*common, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "does not say whether" in refused.output and "Traceback" not in refused.output
    out = tmp_path / "cache"
    built = runner.invoke(app, [*common, "--out", str(out), "--quick-gelu"])
    assert built.exit_code == 0, built.output
    recorded = json.loads((out / "manifest.json").read_text())["model"]["architecture"]
    assert recorded["quick_gelu"] and recorded["text_activation"] == "quick_gelu"
    train = ["train", "--cache", str(out), "--out", str(tmp_path / "runs"), "--methods", "zeroshot", "--no-progress"]
    contradicted = runner.invoke(app, [*train, "--no-quick-gelu"])
    assert contradicted.exit_code == 2 and "drop --no-quick-gelu" in contradicted.output
    trained = runner.invoke(app, train)
    assert trained.exit_code == 0, trained.output


def test_transfer_refuses_a_target_cache_of_another_network(registry):
    """Same weights, other network: a transfer target cached with GELU is refused like a training cache."""
    from fastprompt.train.transfer import TransferTargets

    clip = load_clip(TINY, "quick")
    record = model_record(clip, "fp32")
    other = dict(record, architecture=dict(record["architecture"], quick_gelu=False, text_activation="gelu",
                                           image_activation="gelu"))  # fmt: skip
    source = _cache(record, "caches/source")
    with pytest.raises(FastPromptError, match="rebuild the cache") as error:
        TransferTargets([_cache(other, "caches/target")], source, clip)
    assert one_sentence(str(error.value)) and "caches/target" in str(error.value)
