# SPDX-License-Identifier: MIT
"""A small pure-Python safetensors reader: memory-mapped NumPy arrays by tensor name."""

import json
import struct

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def load_safetensors(path, metadata=False):
    """Reads `path` and returns {name: numpy array} (read-only views of a memory map; BF16
    is widened to float32). With metadata=True returns (tensors, header metadata dict)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise OSError(f"seqmix.load_safetensors: {path}: file shorter than its 8-byte header size")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise OSError(f"seqmix.load_safetensors: {path}: header is not JSON: {e}") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        raw = data[b:e]
        if dt == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt in _DTYPES:
            arr = raw.view(_DTYPES[dt])
        else:
            raise OSError(f"seqmix.load_safetensors: {path}: tensor {name!r} has unsupported dtype {dt}")
        out[name] = arr.reshape(shape)
    if metadata:
        return out, header.get("__metadata__", {})
    return out
