"""The KV of one chunk in memory (:class:`KVChunk`) and the KV dtypes kvtier stores; the stored,
checksummed form is :mod:`kvtier.codec`'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> (code, itemsize, numpy storage dtype). bfloat16 and fp8 have no numpy dtype, so
# their bytes are viewed as unsigned integers of the same width.
DTYPES: dict[str, tuple[int, int, str]] = {
    "float32": (1, 4, "<f4"),
    "float16": (2, 2, "<f2"),
    "bfloat16": (3, 2, "<u2"),
    "float8_e4m3fn": (4, 1, "u1"),
    "float8_e5m2": (5, 1, "u1"),
    "uint8": (6, 1, "u1"),
    "int8": (7, 1, "i1"),
}
_NUMPY_TO_NAME = {"float32": "float32", "float16": "float16", "uint8": "uint8", "int8": "int8"}


@dataclass(frozen=True)
class KVChunk:
    """The KV of one chunk: ``data`` holds ``shape`` elements of ``dtype``, contiguous.

    ``shape`` is ``(layers, 2, tokens, kv_heads, head_dim)``. ``data`` may be a read-only view
    into a tier's buffer (reads avoid copies), so treat it as immutable.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    # Rows of head_dim values in which each layer's K and V alternate (0: the layout above,
    # a layer's K then its V). vLLM's AMX-packed CPU cache is moved as opaque blocks, each
    # head's K then its V: its chunks have runs of a block's tokens. k8v4 codes K as K by it.
    runs: int = 0

    @staticmethod
    def check_runs(shape: tuple[int, ...], runs: int) -> None:
        if runs and len(shape) != 5:
            raise ValueError(f"K and V in runs of {runs} rows in a chunk of shape {shape}")
        if runs < 0 or (runs and (shape[2] * shape[3]) % runs):
            raise ValueError(
                f"K and V in runs of {runs} rows: not a divisor of a layer's"
                f" {shape[2] * shape[3]} K rows (shape {shape})"
            )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if len(self.shape) != 5 or any(d <= 0 for d in self.shape):
            raise ValueError(
                f"KV chunk shape must be (layers, 2, tokens, kv_heads, head_dim) with positive"
                f" sizes, got {self.shape}"
            )
        self.check_runs(self.shape, self.runs)
        want = int(np.prod(self.shape)) * DTYPES[self.dtype][1]
        if memoryview(self.data).nbytes != want:
            raise ValueError(
                f"KV chunk data is {memoryview(self.data).nbytes} bytes, shape {self.shape} of"
                f" {self.dtype} needs {want}"
            )

    @property
    def tokens(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    @classmethod
    def from_array(cls, array: np.ndarray, dtype: str | None = None) -> KVChunk:
        """Wrap a numpy array (copied only if it is not C-contiguous).

        ``dtype`` names the KV dtype when the array holds raw bits of a type numpy lacks
        (bfloat16 as uint16, fp8 as uint8); otherwise it is taken from the array.
        """
        name = dtype or _NUMPY_TO_NAME.get(array.dtype.name)
        if name is None:
            raise ValueError(f"cannot tell the KV dtype of a {array.dtype} array; pass dtype=")
        if array.dtype.itemsize != DTYPES.get(name, (0, 0, ""))[1]:
            raise ValueError(f"array of {array.dtype} cannot hold {name} values")
        flat = np.ascontiguousarray(array)
        return cls(name, tuple(int(d) for d in flat.shape), flat.data.cast("B"))

    def numpy(self) -> np.ndarray:
        """A read-only numpy view (bfloat16/fp8 appear as unsigned integers of their width)."""
        arr = np.frombuffer(self.data, dtype=DTYPES[self.dtype][2])
        return arr.reshape(self.shape)
