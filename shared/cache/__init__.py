"""The teacher cache: one logical format (manifest + key/sim/attn rows), Zarr or HDF5 on disk."""

from shared.cache.manifest import FORMAT_VERSION, Manifest
from shared.cache.reader import CacheReader, open_cache
from shared.cache.writer import CacheWriter, normalise_rel

__all__ = ["FORMAT_VERSION", "Manifest", "CacheReader", "open_cache", "CacheWriter", "normalise_rel"]
