"""Compact vectors: shorter ones (a prefix, renormalised: what a Matryoshka model is cut to) and int8, uint8, binary
and ubinary embeddings, and how each is compared.

The vectors are sentence-transformers' ``quantize_embeddings`` (its definitions, computed by it):

* ``int8`` / ``uint8``: each dimension's range [min, max] over *calibration* embeddings, cut into 256 buckets
  (``ranges``: a [2, D] array; values outside clip to the end buckets); int8 is the bucket - 128;
* ``binary`` / ``ubinary``: one bit a dimension (1 where the value is > 0), packed 8 to a byte (D/8 bytes);
  binary is the packed byte - 128 as int8, ubinary the byte as uint8.

Scoring them as a vector store would: int8 and uint8 by the cosine of the integer vectors as stored, binary and
ubinary by Hamming distance (the similarity is minus the number of differing bits). Written here, not taken from a
library, because it is two lines each and ``eval`` needs it per pair.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # the precisions that need ranges


def prefix(vectors: np.ndarray, dims: int) -> np.ndarray:
    """The first ``dims`` coordinates of each vector [N, D], renormalised to unit length."""
    vectors = vectors[:, :dims]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def ranges(calibration: np.ndarray) -> np.ndarray:
    """Per-dimension [min; max] of calibration embeddings [N, D] (N >= 2), as sentence-transformers computes them."""
    if calibration.ndim != 2 or len(calibration) < 2:
        raise ValueError("calibration needs at least two embeddings")
    return np.vstack((calibration.min(axis=0), calibration.max(axis=0))).astype(np.float32)


def quantize(embeddings: np.ndarray, precision: str, bounds: np.ndarray | None = None) -> np.ndarray:
    """``embeddings`` [N, D] (float) at ``precision``; int8 and uint8 need ``bounds`` (``ranges``)."""
    if precision == "float32":
        return np.asarray(embeddings, dtype=np.float32)
    if precision in CALIBRATED and bounds is None:
        raise ValueError(f"{precision} needs calibration ranges")
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:  # sentence-transformers < 6.2
        from sentence_transformers.quantization import quantize_embeddings

    return quantize_embeddings(np.asarray(embeddings, dtype=np.float32), precision, ranges=bounds)


def bits(vectors: np.ndarray, precision: str) -> np.ndarray:
    """The 0/1 bits [N, D'] of packed binary or ubinary vectors (D' is D rounded up to a multiple of 8)."""
    packed = (vectors.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else vectors
    return np.unpackbits(packed, axis=-1)


def pair_similarity(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """Similarity of rows a[i] and b[i] at ``precision``: cosine (float32, int8, uint8) or minus Hamming distance."""
    if precision in ("binary", "ubinary"):
        return -(bits(a, precision) != bits(b, precision)).sum(axis=1).astype(np.float32)
    a, b = a.astype(np.float32), b.astype(np.float32)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)
