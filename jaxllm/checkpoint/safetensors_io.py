"""HF safetensors checkpoints: a single `model.safetensors` or shards listed in `model.safetensors.index.json`.

Tensors are memory-mapped (the format is an 8-byte header length, a JSON header with dtype/shape/offsets, then raw
little-endian data), so a sharded 70B checkpoint is read tensor by tensor without loading whole files, and bfloat16
works without torch. The header is validated; a truncated or corrupt file is an error naming it.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or 8 + n > size:
          raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
    header.pop("__metadata__", None)
    self._data_start = 8 + n
    self._size = size
    self._header = header

  def names(self):
    return self._header.keys()

  def get(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != count * dtype.itemsize or self._data_start + end > self._size:
      raise ValueError(f"{self.path}: tensor {name!r} data is truncated or its offsets are corrupt.")
    arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=(count,))
    return arr.reshape(info["shape"])


class SafetensorsCheckpoint:
  """All tensors of an HF model directory, by name."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError) as e:
        raise ValueError(f"{index} is not a valid safetensors index ({e}).") from None
      files = {fn: None for fn in weight_map.values()}
      for fn in files:
        path = os.path.join(directory, fn)
        if not os.path.exists(path):
          raise FileNotFoundError(f"{index} lists shard {fn!r}, which does not exist in {directory}.")
        files[fn] = SafetensorsFile(path)
      self._where = {name: files[fn] for name, fn in weight_map.items()}
    else:
      shards = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors"))
      if not shards:
        raise FileNotFoundError(f"{directory} has no *.safetensors files.")
      self._where = {}
      for fn in shards:
        f = SafetensorsFile(os.path.join(directory, fn))
        self._where.update({name: f for name in f.names()})

  def names(self):
    return self._where.keys()

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)
