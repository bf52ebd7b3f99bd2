"""Reading PyTorch state dicts from files without PyTorch objects in the loop.

`read_state_dict(path)` returns a read-only mapping `name -> float32 numpy array` whose tensors are
read one at a time when accessed, so converting a checkpoint needs little more host memory than
the converted weights themselves:

- `*.safetensors` (and a sharded `*.safetensors.index.json`) through `safetensors.safe_open`,
  framework "np", which memory-maps the file. numpy has no bfloat16, so bf16 tensors are decoded
  from their raw bytes (a bf16 value is the upper half of a float32).
- pickled `*.ckpt` / `*.bin` / `*.pt` / `*.pth` only through `torch.load(weights_only=True)`,
  PyTorch's restricted unpickler that accepts tensors and plain containers and refuses arbitrary
  objects. Without torch installed this is an error saying so.

All floating-point tensors come back as float32 (fp16/bf16 checkpoints are upcast); integer
buffers keep their dtype.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _to_float32(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


class SafetensorsStateDict(Mapping):
    """Lazy mapping over one or more safetensors files (shards). `shape(key)` reads no data."""

    def __init__(self, paths: list[pathlib.Path]):
        from safetensors import safe_open

        self._files = {}  # key -> open handle
        self._handles = []
        self._paths = {}
        for path in paths:
            try:
                handle = safe_open(str(path), framework="np")
            except Exception as e:  # SafetensorError: truncated or corrupt header
                raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
            self._handles.append(handle)
            for key in handle.keys():
                if key in self._files:
                    raise CheckpointError(f"tensor {key!r} appears in two shards ({path})")
                self._files[key] = handle
                self._paths[key] = path

    def __getitem__(self, key: str) -> np.ndarray:
        handle = self._files[key]
        tensor_slice = handle.get_slice(key)
        if tensor_slice.get_dtype() == "BF16":
            return self._read_bf16(key, tuple(tensor_slice.get_shape()))
        try:
            return _to_float32(handle.get_tensor(key))
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self._paths[key]}: {e}") from e

    def _read_bf16(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Decode a bfloat16 tensor from the file bytes: float32 bits = bf16 bits << 16."""
        path = self._paths[key]
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        start, end = header[key]["data_offsets"]
        count = math.prod(shape)
        if end - start != 2 * count:
            raise CheckpointError(
                f"tensor {key!r} in {path}: {end - start} bytes for shape {shape}"
            )
        raw = np.memmap(path, np.uint16, "r", offset=8 + header_len + start, shape=(count,))
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._files[key].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class ArrayStateDict(Mapping):
    """Mapping over in-memory tensors (from torch.load); converts each to numpy when accessed."""

    def __init__(self, tensors: Mapping):
        self._tensors = dict(tensors)

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._tensors[key]
        if hasattr(value, "detach"):  # torch.Tensor: bf16 has no numpy dtype, go through float32
            value = value.detach()
            if value.is_floating_point():
                value = value.float()
            value = value.numpy()
        return _to_float32(np.asarray(value))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _torch_load(path: pathlib.Path) -> ArrayStateDict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a pickled checkpoint; reading it safely needs PyTorch "
            "(torch.load(weights_only=True)), which is not installed. Install torch, or convert "
            "the file to .safetensors."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format; legacy pickles load without it
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot read {path} with torch.load(weights_only=True): {e}"
            ) from e
    except Exception as e:  # pickle.UnpicklingError for objects outside the allow-list
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    # Lightning/CompVis .ckpt files nest the weights under "state_dict" next to step counters.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return ArrayStateDict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def read_state_dict(path: str | pathlib.Path) -> Mapping[str, np.ndarray]:
    """Read a state dict `name -> float32 array` (PyTorch layout) lazily from a weights file.

    Args:
      path: a `.safetensors` file, a sharded `.safetensors.index.json`, or a pickled
        `.ckpt`/`.bin`/`.pt`/`.pth` file (needs torch; read with `weights_only=True`).
    Returns:
      A Mapping whose values are read on access; it also has `shape(key)`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    name = path.name
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path} is not a sharded-checkpoint index: {e}") from e
        shards = sorted({path.parent / shard for shard in weight_map.values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path} lists shards that do not exist: {missing}")
        if not all(s.name.endswith(SAFETENSORS_SUFFIXES) for s in shards):
            return _merge_pickled(shards)
        return SafetensorsStateDict(shards)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsStateDict([path])
    if name.endswith(PICKLE_SUFFIXES):
        return _torch_load(path)
    raise CheckpointError(
        f"unknown checkpoint format {path.suffix!r} for {path}; expected .safetensors, "
        f"or (with torch installed) one of {PICKLE_SUFFIXES}"
    )


def _merge_pickled(shards: list[pathlib.Path]) -> ArrayStateDict:
    merged = {}
    for shard in shards:
        part = _torch_load(shard)
        merged.update(part._tensors)
    return ArrayStateDict(merged)
