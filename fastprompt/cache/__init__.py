"""The feature cache: `build_cache` writes it (`fastprompt cache`), `FeatureCache` loads it (docs/FORMATS.md).

`build_cache` is imported on first use, so that loading a cache does not import the image pipeline (torchvision).
"""

from __future__ import annotations

from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions

__all__ = ["CacheOptions", "CacheSummary", "FeatureCache", "build_cache"]


def __getattr__(name: str):
    if name in ("build_cache", "CacheSummary"):
        from fastprompt.cache import extract

        return getattr(extract, name)
    raise AttributeError(f"module 'fastprompt.cache' has no attribute '{name}'")
