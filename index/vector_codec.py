"""How a stored vector is laid out in bytes: float32 or float16, little endian (REID_STORE_DTYPE).

Storage only: whatever a vector is stored as, it is read back as float32, and the FAISS indexes and every
search work in float32. float16 halves a vector's bytes in Redis; it keeps 11 significant bits, so an
L2-normalised feature moves by at most ~2.4e-4 per component (``bench/store_dtype.py`` measures what
that does to retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DTYPES", "VectorCodec"]

#: stored dtype name -> numpy little-endian dtype
DTYPES = {"float32": "<f4", "float16": "<f2"}


@dataclass(frozen=True)
class VectorCodec:
    name: str

    @classmethod
    def named(cls, name: str) -> "VectorCodec":
        if name not in DTYPES:
            raise ValueError(f"unknown stored vector dtype {name!r} (use {' or '.join(DTYPES)})")
        return cls(name)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.name])

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize

    def nbytes(self, dim: int) -> int:
        """Bytes of one stored vector of dimension ``dim``."""
        return self.itemsize * int(dim)

    def dim_of(self, raw: bytes) -> int:
        return len(raw) // self.itemsize

    def encode(self, vectors: np.ndarray) -> bytes:
        """The bytes of one vector, or of a (n, d) matrix row after row. Raises ValueError for values that the
        dtype cannot hold (a float16 overflow would otherwise be stored as inf)."""
        arr = np.asarray(vectors, dtype=np.float32)
        with np.errstate(over="ignore"):  # checked just below, with a clearer message
            out = np.ascontiguousarray(arr.astype(self.numpy_dtype))
        if self.name != "float32" and not np.all(np.isfinite(out[np.isfinite(arr)])):
            raise ValueError(f"a vector component is outside the {self.name} range (|x| > 65504); store float32")
        return out.tobytes()

    def encode_rows(self, vectors: np.ndarray) -> list[bytes]:
        """One bytes value per row of a (n, d) matrix."""
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"expected an (n, d) matrix, got shape {arr.shape}")
        blob = self.encode(arr)
        step = self.nbytes(arr.shape[1])
        return [blob[i * step:(i + 1) * step] for i in range(arr.shape[0])]

    def decode(self, raw: bytes, dim: int | None = None) -> np.ndarray:
        """float32 ``(d,)`` from one stored vector, or ``(n, dim)`` from ``n`` of them joined."""
        arr = np.frombuffer(raw, dtype=self.numpy_dtype).astype(np.float32)
        return arr if dim is None else arr.reshape(-1, int(dim))

    def decode_many(self, raws: Sequence[bytes], dim: int) -> np.ndarray:
        """float32 ``(n, dim)`` from ``n`` stored vectors of dimension ``dim`` (one copy)."""
        if not raws:
            return np.zeros((0, int(dim)), np.float32)
        return self.decode(b"".join(raws), dim)
