"""A reference model's vectors of the training sentences, for the objectives that learn from one (losses.REFERENCE:
guided negatives, distillation).

``train.reference`` names the reference: a packaged model, a model folder, a hub id or a finished training run, or
several (their ensemble: ensemble.py); run.py checks a folder before any work. Before the loop, every unique
training sentence is embedded once by it, the model is freed, and the unit vectors stay on the training device as a
table (float16) whose row ``k`` is the ``k``-th of the sorted unique sentences; a step takes the rows of its texts
(``Reference.rows``). Under several processes each encodes every W-th sentence and the shares are gathered.

The table is cached in the run folder (``RunDir.reference``) with what it was made from: the digest of the
reference's weight files (digest.py), its embedding spec, and the digest of the sentences. A resumed run reads it
instead of encoding again, and refuses one made from another reference or other sentences.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slmembed.atomic import atomic_path
from slmembed.config import Recipe
from slmembed.digest import weights_sha256
from slmembed.embedder import Embedder, batching
from slmembed.ensemble import Ensemble
from slmembed.errors import SlmembedError
from slmembed.loading import load_embedder
from slmembed.losses.infonce import gather
from slmembed.run import RunDir


@dataclass
class Reference:
    """The reference's unit vectors of the training sentences: ``vectors`` [N, R] (float16, on the training device),
    row ``index[text]`` for each text; ``made_from`` identifies the reference and the sentences (the cache's)."""

    vectors: torch.Tensor
    index: dict[str, int]
    made_from: dict[str, str]

    def rows(self, texts: Sequence[str | None]) -> torch.Tensor:
        """The vectors of ``texts`` [len(texts), R], in order; a missing text (None) gets row 0 (masked out by the
        objectives, as its embedding is)."""
        rows = torch.tensor([0 if t is None else self.index[t] for t in texts])
        if self.vectors.device.type == "cuda":  # from pinned memory the copy does not make the host wait for the GPU
            rows = rows.pin_memory()
        return self.vectors[rows.to(self.vectors.device, non_blocking=True)]

    def save(self, run_dir: Path) -> None:
        """Write the table into the run folder (``RunDir.reference``), atomically."""
        with atomic_path(RunDir(run_dir).reference) as tmp:
            save_file({"vectors": self.vectors.cpu().contiguous()}, tmp, metadata=self.made_from)


def _load(source: str, device: torch.device, trust_remote_code: bool, allow_pickle: bool) -> Embedder:
    """The model ``source`` names: a run (or adapter) folder, or a model by name or folder."""
    path = Path(source).expanduser()
    kwargs = {"device": device, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    # A folder without config.json is a run (or adapter) folder: models.resolve takes no other folder as a model.
    run = path.is_dir() and not (path / "config.json").is_file()
    try:
        return load_embedder(None, adapter=path, **kwargs) if run else load_embedder(source, **kwargs)
    except SlmembedError as exc:  # an unknown name, a model that does not load: say which setting named it
        raise SlmembedError(f"train.reference: {exc}") from None


def _encoder(recipe: Recipe, device: torch.device) -> tuple[Callable[[list[str]], np.ndarray], dict[str, str]]:
    """The recipe's reference as a function from texts to unit vectors [N, R], and what identifies it: the digest of
    its weight files and its embedding spec. Several models are their ensemble (ensemble.py), whose vectors give the
    mean of the members' cosine similarities."""
    members = [_load(source, device, recipe.model.trust_remote_code, recipe.model.allow_pickle)
               for source in recipe.train.references]
    model = members[0] if len(members) == 1 else Ensemble(members, recipe.train.references)
    batch_size, max_tokens = batching(model)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, max_tokens=max_tokens)

    return encode, {"weights": weights_sha256([source for m in members for source in m.sources]),
                    "spec": json.dumps([m.spec.__dict__ for m in members])}


def _encode(encode: Callable[[list[str]], np.ndarray], texts: list[str], rank: int, world: int,
            device: torch.device) -> torch.Tensor:
    """Every text's vector [N, R] (float16, on ``device``): this process encodes every ``world``-th text from
    ``rank`` on, and the shares are gathered (padded to one size, as the collective needs)."""
    mine = torch.from_numpy(encode(texts[rank::world])).to(device, torch.float16)
    if world == 1:
        return mine
    size = -(-len(texts) // world)
    padded = torch.cat([mine, mine.new_zeros((size - mine.shape[0], mine.shape[1]))])
    (shares,) = gather(padded)  # [world * size, R], rank by rank; text k is row k // world of rank k % world's
    return shares.view(world, size, -1).transpose(0, 1).reshape(world * size, -1)[: len(texts)]


def vectors(recipe: Recipe, texts: list[str], run_dir: Path | None, device: torch.device, rank: int = 0,
            world: int = 1) -> tuple[Reference, bool]:
    """The vectors of the sorted unique sentences ``texts`` by the recipe's ``train.reference``, and whether they were
    encoded now (to be saved) rather than read from the cache of ``run_dir`` (a resumed run's, if it has one). Every
    process calls this; the reference is freed before it returns."""
    encode, made_from = _encoder(recipe, device)
    made_from = {"reference": json.dumps(recipe.train.reference), **made_from, "sentences": _digest(texts)}
    index = {text: k for k, text in enumerate(texts)}
    cache = RunDir(run_dir).reference if run_dir is not None else None
    if cache is not None and cache.is_file():
        return Reference(_read(cache, made_from, device), index, made_from), False
    table = _encode(encode, texts, rank, world, device)
    del encode  # the reference model: only its vectors are kept
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Reference(table, index, made_from), True


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def _read(cache: Path, made_from: dict[str, str], device: torch.device) -> torch.Tensor:
    """The table in ``cache``, which must have been made from what ``made_from`` says; else a one-line error."""
    try:
        with safe_open(cache, framework="pt", device="cpu") as fh:
            saved, table = fh.metadata() or {}, fh.get_tensor("vectors")
    except Exception as exc:  # safetensors' errors for a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SlmembedError(f"{cache}: cannot be read as the reference's vectors ({reason}); delete it to encode the "
                            "sentences again") from None
    differs = [key for key in ("weights", "spec", "sentences") if saved.get(key) != made_from[key]]
    if differs:
        what = {"weights": "weight files", "spec": "embedding spec", "sentences": "training sentences"}
        raise SlmembedError(f"{cache} was made from other {' and '.join(what[k] for k in differs)} than this run's "
                            "train.reference and data give now: resume with the ones the run started with, or delete "
                            "the file to encode again")
    return table.to(device)
