"""Ensembles of embedding models: the similarity of two texts is the mean of the members' cosine similarities.

``Ensemble.encode`` returns, per text, the concatenation of the ``k`` members' unit vectors, each scaled by
``1/sqrt(k)``. The dot product of two such vectors is ``sum_i u_i . v_i / k``, the mean of the members' cosines, and
each vector's norm is 1, so their cosine is that mean, exactly. Wherever an Embedder's vectors are used (evaluate,
embed_file, a distillation teacher), an ensemble's can be. Members may differ in backbone, tokenizer and spec: each
encodes the texts its own way.

The ensemble offers what ``evaluate`` and ``embedder.batching`` use of an Embedder: ``encode``, ``device`` and
``packed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from slmembed.embedder import Embedder


class Ensemble:
    """Embedders whose cosine similarities are averaged (see the module docstring); ``names`` label them in
    results (``record``)."""

    def __init__(self, members: Sequence[Embedder], names: Sequence[str]) -> None:
        if not members or len(members) != len(names):
            raise ValueError(f"an ensemble needs one name per member and at least one member, got {len(members)} "
                             f"members and {len(names)} names")
        self.members, self.names = list(members), [str(n) for n in names]

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def packed(self) -> bool:
        """Whether every member runs packed batches: ``batching`` then gives the packed default (a token budget),
        otherwise the padded one, which packed members run as well."""
        return all(m.packed for m in self.members)

    def encode(self, texts: Sequence[str], batch_size: int | None = 64, max_tokens: int | None = None,
               progress: bool = False) -> np.ndarray:
        """Float32 unit vectors [N, sum of the members' sizes] in input order (``Embedder.encode``'s arguments,
        passed to each member)."""
        scale = 1 / math.sqrt(len(self.members))
        parts = [m.encode(texts, batch_size=batch_size, max_tokens=max_tokens, progress=progress) * scale
                 for m in self.members]
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    def record(self) -> list[dict]:
        """The members as result files record them: name, base model, spec and weights' dtype."""
        return [{"run": name, "model": m.sources[0] if m.sources else None, "spec": m.spec.__dict__,
                 "dtype": m.weights} for name, m in zip(self.names, self.members, strict=True)]
