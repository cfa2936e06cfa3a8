"""The feature cache: `build_cache` writes it (`fastprompt cache`), `FeatureCache` loads it (docs/FORMATS.md)."""

from __future__ import annotations

from fastprompt.cache.extract import CacheSummary, build_cache
from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions

__all__ = ["CacheOptions", "CacheSummary", "FeatureCache", "build_cache"]
