"""Reading a source checkpoint's tensors lazily: every name, shape and dtype first, data one file at a time.

A folder holds safetensors or ``pytorch_model*.bin`` files, sharded (with an index) or not. ``.bin``
files are read with ``torch.load(weights_only=True)``, memory-mapped when the file allows it, so no
pickle code is ever executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from shared.errors import MedAlignError
from shared.records import read_json

#: safetensors' dtype names -> torch dtypes (anything else is read as float32 metadata).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class WeightSource:
    """The tensors of a checkpoint folder (safetensors or ``pytorch_model*.bin``, sharded or not).

    ``key_file`` maps every tensor name to its file without loading data; ``tensors(file)`` yields
    one file's tensors. ``.bin`` files are read with ``torch.load(weights_only=True)`` (mmap when
    the file allows it); no pickle code is ever executed.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = self._weight_files(folder)
        self._bin_cache: tuple[Path, dict] | None = None
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for f in self.files:
            for k in self._read_meta(f):
                self.key_file[k] = f

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise MedAlignError(f"{index}: no 'weight_map' object")
                files = sorted({folder / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise MedAlignError(f"{index} lists missing shard(s): {', '.join(missing)}")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(folder.glob(pattern))
            if files:
                return files
        raise MedAlignError(f"{folder}: no weights found (model.safetensors[.index.json] or pytorch_model*.bin)")

    def _read_meta(self, f: Path) -> Iterator[str]:
        """Yield the tensor names of file ``f``, recording their shapes and dtypes."""
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                    yield k
        else:
            for k, t in self._load_bin(f).items():
                if not isinstance(t, torch.Tensor):
                    continue
                self.shapes[k] = tuple(t.shape)
                self.dtypes[k] = t.dtype
                yield k

    def _load_bin(self, f: Path) -> dict:
        if self._bin_cache is not None and self._bin_cache[0] == f:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) serialisation cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal is a user-facing error
            raise MedAlignError(f"{f}: cannot load with torch.load(weights_only=True): {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise MedAlignError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
        self._bin_cache = (f, sd)
        return sd

    def tensors(self, f: Path, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors named in ``keys`` from file ``f``, in file order."""
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k in keys:
                        yield k, sf.get_tensor(k)
        else:
            for k, t in self._load_bin(f).items():
                if k in keys:
                    yield k, t
            self._bin_cache = None
