"""What a server serves: one model, or many LoRA adapters over one base model (``slmembed serve RUN1 RUN2 ...``).

Many adapters share one copy of the base model: each run's adapter is loaded into one PeftModel under the run's
name with peft's multi-adapter support (``load_adapter`` / ``set_adapter`` / ``delete_adapter``) and never merged,
and a batch runs with its adapter set active. At most ``max_loaded`` adapters are held; asking for another unloads
the least recently used one and loads the asked one from its folder again. Only the server's worker thread makes an
adapter active (``embedder``), one batch at a time, so switching adapters needs no lock; its tokenising thread asks
with ``active=False``, which only reads the run's tokenizer and spec.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from slmembed import models
from slmembed.device import best_dtype, resolve_device
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDir
from slmembed.spec import EmbedSpec


class Single:
    """One model under one name."""

    def __init__(self, embedder: Embedder, name: str) -> None:
        self.names, self._embedder = [name], embedder

    def spec(self, name: str) -> EmbedSpec:
        return self._embedder.spec

    def embedder(self, name: str, active: bool = True) -> Embedder:
        return self._embedder

    def stats(self) -> dict:
        return {}


@dataclass(frozen=True)
class _Run:
    folder: Path  # the adapter folder (adapter_config.json, adapter_model.safetensors)
    spec: EmbedSpec
    base: str


def _run(path: Path, allow_pickle: bool) -> _Run:
    """A training run folder's adapter, embedding spec and base model; full fine-tuning runs have no adapter."""
    run = RunDir.find(path)
    info = run.info()
    if info.finetune == "full":
        raise SlmembedError(f"{path}: a full fine-tuning run has no adapter to share a base model with; serve it alone")
    if not (run.adapter / ADAPTER_CONFIG).exists():
        raise SlmembedError(f"{run.adapter}: no {ADAPTER_CONFIG}: the run's adapter is missing")
    models.refuse_pickle(run.adapter, ADAPTER_WEIGHTS, allow_pickle)
    return _Run(run.adapter, info.spec, info.model)


class AdapterPool:
    """Training runs' LoRA adapters over one shared base model (see the module docstring)."""

    def __init__(self, runs: dict[str, Path], *, max_loaded: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        from peft import PeftModel

        self.runs = {name: _run(Path(path), allow_pickle) for name, path in runs.items()}
        first = next(iter(self.runs.values()))
        for name, run in self.runs.items():
            if run.base != first.base:
                raise SlmembedError(f"{name} was trained on {run.base}, not {first.base}: adapters served together "
                                    "must share their base model")
            if run.spec.attention != first.spec.attention:
                raise SlmembedError(f"{name} uses {run.spec.attention} attention, not {first.spec.attention}: adapters "
                                    "served together must share it (it is a setting of the base model)")
        self.names = list(self.runs)
        self.max_loaded = min(max_loaded or len(self.names), len(self.names))
        device = device or resolve_device()
        base, self.tokenizer = models.load(first.base, dtype=dtype or best_dtype(device),
                                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                           device=device)
        name = self.names[0]
        self.model = PeftModel.from_pretrained(base, str(first.folder), adapter_name=name).to(device).eval()
        self.loaded: OrderedDict[str, None] = OrderedDict({name: None})  # least recently used first
        # All made here: making one sets the model's attention and packing, which must not happen beside a batch.
        self.embedders = {name: Embedder(self.model, self.tokenizer, run.spec) for name, run in self.runs.items()}
        self.loads, self.unloads = 1, 0

    def spec(self, name: str) -> EmbedSpec:
        return self.runs[name].spec

    def embedder(self, name: str, active: bool = True) -> Embedder:
        """The Embedder of adapter ``name``, made the active adapter (loaded first, unloading the least recently used
        one if ``max_loaded`` are held); with ``active=False`` as it is, for its tokenizer and spec only."""
        if not active:
            return self.embedders[name]
        if name not in self.loaded:
            if len(self.loaded) >= self.max_loaded:
                old, _ = self.loaded.popitem(last=False)
                self.model.delete_adapter(old)
                self.unloads += 1
            self.model.load_adapter(str(self.runs[name].folder), adapter_name=name, is_trainable=False)
            self.loads += 1
        self.loaded[name] = None
        self.loaded.move_to_end(name)
        self.model.set_adapter(name)
        return self.embedders[name]

    def stats(self) -> dict:
        return {"adapters_loaded": list(self.loaded), "adapter_loads": self.loads, "adapter_unloads": self.unloads}
