"""Step caches: the region-aware cache of the tiled loop (:mod:`supergen.cache.region`)."""

from supergen.cache.region import CacheSchedule, RegionCache

__all__ = ["CacheSchedule", "RegionCache"]
