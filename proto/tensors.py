"""numpy arrays to and from the ``matmamba.v1.Tensor`` wire message (numpy only, no torch).

Wire format (see ``Tensor`` in matmamba.proto): ``dtype`` enum, ``shape`` (int64 dims,
outermost first) and ``data``, the elements in row-major order, each little-endian.

    msg = to_tensor_msg(images)                                  # (N, C, H, W) uint8
    images = from_tensor_msg(msg, max_elements=64 * 1 * 28 * 28)  # validated, writable

bfloat16: numpy has no bfloat16 type. ``to_tensor_msg(x, bfloat16=True)`` rounds a float
array to bfloat16 (round to nearest even) and sends its 16-bit patterns;
``from_tensor_msg`` decodes BFLOAT16 to float32, exactly, by widening each 16-bit
pattern into the top half of a float32 (``bits << 16``).
"""

from __future__ import annotations

import math

import numpy as np

from . import matmamba_pb2 as pb

# Wire dtype -> little-endian numpy dtype of its elements as stored in ``data``.
# BFLOAT16 is stored as its raw 16-bit patterns and widened to float32 on decode.
WIRE_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.UINT8: np.dtype("u1"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
}
# numpy dtype kind+size -> wire dtype, for the arrays to_tensor_msg sends as they are.
_FROM_NUMPY: dict[tuple[str, int], int] = {
    ("f", 4): pb.FLOAT32,
    ("f", 2): pb.FLOAT16,
    ("u", 1): pb.UINT8,
    ("i", 8): pb.INT64,
    ("i", 4): pb.INT32,
}
# Rounding bias for float32 -> bfloat16 round-to-nearest-even: half of the 16 dropped bits, minus one.
_BF16_ROUND_BIAS = 0x7FFF
# The canonical quiet NaN pattern of bfloat16 (sign bit added separately).
_BF16_QUIET_NAN = 0x7FC0


class TensorFormatError(ValueError):
    """A Tensor message (or an array to encode) does not satisfy the wire format."""


def dtype_name(dtype: int) -> str:
    """Enum name of a wire dtype, or ``"<unknown N>"`` for a value this build does not know."""
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return f"<unknown {dtype}>"


def _supported() -> str:
    return ", ".join(pb.DType.Name(d) for d in WIRE_DTYPES)


def _float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``array`` rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + _BF16_ROUND_BIAS + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    sign = ((bits >> 16) & 0x8000).astype(np.uint16)
    return np.where(np.isnan(array), sign | _BF16_QUIET_NAN, rounded).astype(np.uint16)


def to_tensor_msg(array: np.ndarray, *, bfloat16: bool = False) -> pb.Tensor:
    """Encode ``array`` as a Tensor message.

    Sent as they are: float32, float16, uint8, int64, int32 arrays (any byte order; the
    wire is little-endian). With ``bfloat16=True`` a floating array is rounded to
    bfloat16 and sent as BFLOAT16. Other dtypes raise TensorFormatError: convert first,
    e.g. ``array.astype(np.float32)``.
    """
    array = np.asarray(array)
    if bfloat16:
        if array.dtype.kind != "f":
            raise TensorFormatError(f"bfloat16=True needs a floating array, got dtype {array.dtype}")
        wire, payload = pb.BFLOAT16, _float32_to_bfloat16_bits(array)
    else:
        wire = _FROM_NUMPY.get((array.dtype.kind, array.dtype.itemsize))
        if wire is None:
            raise TensorFormatError(
                f"cannot send numpy dtype {array.dtype}: supported are float32, float16, uint8, "
                "int64, int32 (or any float with bfloat16=True); convert with array.astype(...)"
            )
        payload = array
    data = np.ascontiguousarray(payload, dtype=WIRE_DTYPES[wire]).tobytes()
    return pb.Tensor(dtype=wire, shape=array.shape, data=data)


def _check_header(msg: pb.Tensor, max_elements: int) -> tuple[np.dtype, list[int]]:
    """Validate dtype, shape, element count and byte length; return (wire dtype, shape)."""
    if msg.dtype not in WIRE_DTYPES:
        raise TensorFormatError(
            f"tensor dtype is {dtype_name(msg.dtype)} ({msg.dtype}); expected one of {_supported()}"
        )
    shape = list(msg.shape)
    negative = [(i, d) for i, d in enumerate(shape) if d < 0]
    if negative:
        i, d = negative[0]
        raise TensorFormatError(f"tensor shape {shape} has dimension {i} = {d}; every dimension must be >= 0")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorFormatError(
            f"tensor shape {shape} has {count:,} elements; at most {max_elements:,} are accepted here"
        )
    wire = WIRE_DTYPES[msg.dtype]
    if len(msg.data) != count * wire.itemsize:
        raise TensorFormatError(
            f"tensor data has {len(msg.data):,} bytes; shape {shape} of {pb.DType.Name(msg.dtype)} needs "
            f"{count * wire.itemsize:,} ({count:,} elements x {wire.itemsize} bytes)"
        )
    return wire, shape


def from_tensor_msg(msg: pb.Tensor, *, max_elements: int) -> np.ndarray:
    """Decode and validate a Tensor message into a new, writable, native-byte-order array.

    ``max_elements`` caps product(shape); it is required so that every server states
    the largest tensor it accepts. Raises TensorFormatError when the dtype is unset or
    unknown, a dimension is negative, there are more than ``max_elements`` elements, or
    ``len(data)`` is not product(shape) * itemsize. Returns float32 for BFLOAT16.
    """
    if max_elements < 0:
        raise ValueError(f"max_elements must be >= 0, got {max_elements}")
    wire, shape = _check_header(msg, max_elements)
    flat = np.frombuffer(msg.data, dtype=wire)
    if msg.dtype == pb.BFLOAT16:
        return (flat.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return flat.astype(wire.newbyteorder("="), copy=True).reshape(shape)
