"""The gradient store: crash-safe, checksummed, memory-mapped shards of projected gradient rows.

- `files`: durable writes (temp, fsync, rename, fsync of the directory) and streaming SHA-256.
- `manifest`: the on-disk format: file names, the manifest and its strict parser.
- `encoding`: rows in the storage dtype (float32, bfloat16, float16 with per-row scales).
- `statistics`: Kronecker statistics as an .npz.
- `writer`: `StoreWriter`, appending rows and committing whole shards atomically; resume.
- `reader`: `GradientStore`, a read-only snapshot; `verify()`; `check_compatible`.
- `merge`: `merge_rank_manifests`, one manifest over the shards of every rank.
"""

from logra.store.manifest import MANIFEST, read_manifest
from logra.store.merge import merge_rank_manifests
from logra.store.reader import GradientStore, check_compatible
from logra.store.writer import StoreWriter

__all__ = ["MANIFEST", "GradientStore", "StoreWriter", "check_compatible", "merge_rank_manifests", "read_manifest"]
