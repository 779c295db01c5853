"""What a model name or folder is, and the Embedder that runs it (``load_embedder``).

What is loaded, by what the folder holds:

* a training run (run.RunDir.locate: its saved spec, run.EmbedInfo, says so), or its ``adapter/`` or ``model/``
  subfolder: the base model it names with the LoRA adapter merged in, or, for a run that trained every weight, its
  own ``model/``; the run's embedding spec;
* an ``slmembed export`` folder (its saved spec says so): the merged model with its spec, or the kept adapter over the
  base model (``merged: false``); an ONNX export runs its ``model.onnx`` in onnxruntime (onnx_model.py);
* a sentence-transformers folder: the model with its pooling, prompt, length, head and lower-casing (st_pipeline.py),
  or a refusal naming what slmembed cannot apply;
* any other model (packaged name, transformers folder, hub id): decoder defaults (last token + EOS);
* a PEFT adapter folder given as ``adapter`` with its base model as ``model``: the adapter merged into it.

This module sits above embedder.py and onnx_model.py, which know nothing of folders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from slmembed import models, onnx_model, st_pipeline
from slmembed.device import best_dtype, resolve_device
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EmbedInfo, RunDir
from slmembed.spec import EmbedSpec


@dataclass(frozen=True)
class _Source:
    """What to load: ``model`` (a name or folder, for models.load), the ``adapter`` folder merged into it, the
    ``spec``, a sentence-transformers ``pipeline``, or an ONNX export folder (``onnx``)."""

    model: str
    spec: EmbedSpec
    adapter: Path | None = None
    pipeline: st_pipeline.Pipeline | None = None
    onnx: Path | None = None


def _with_adapter(model: str | None, folder: Path, allow_pickle: bool) -> _Source:
    """``folder`` given as an adapter: a run, an export that kept its adapter, or a plain PEFT adapter folder."""
    run = RunDir.locate(folder)
    if run is not None:
        info = run.info()
        if info.finetune == "full":
            return _Source(str(run.model), info.spec)
        model, adapter = model or info.model, run.adapter
    else:
        info = EmbedInfo.read(folder)
        model = model or (info.model if info else None)
        adapter = RunDir(folder).adapter if RunDir(folder).adapter.is_dir() else folder  # an unfinished run's too
    if not (adapter / ADAPTER_CONFIG).exists():
        raise SlmembedError(f"{folder}: no {ADAPTER_CONFIG} (expected a training run or adapter folder)")
    models.refuse_pickle(adapter, ADAPTER_WEIGHTS, allow_pickle)
    if model is None:
        raise SlmembedError("no model given: pass --model, or --run with a training run folder")
    return _Source(model, info.spec if info else EmbedSpec(), adapter=adapter)


def _source(model: str | None, adapter: str | Path | None = None, allow_pickle: bool = False) -> _Source:
    """What ``model`` (and ``adapter``) name, as the module docstring says; one-line errors before anything loads."""
    if adapter is not None:
        return _with_adapter(model, Path(adapter), allow_pickle)
    if model is None:
        raise SlmembedError("no model given: pass --model, or --run with a training run folder")
    local = Path(model).expanduser()
    if RunDir.locate(local) or (local / ADAPTER_CONFIG).exists():  # a run, or an export that kept its adapter
        return _with_adapter(None, local, allow_pickle)
    folder = Path(models.resolve(model))
    info = EmbedInfo.read(folder)
    if info is not None:
        return _Source(model, info.spec, onnx=folder if (folder / onnx_model.FILE).exists() else None)
    pipeline = st_pipeline.read(folder)
    if pipeline is None:
        return _Source(model, EmbedSpec())
    # The tokenizer adds the special tokens sentence-transformers gets: no EOS appended.
    spec = EmbedSpec(pooling=pipeline.pooling, prompt=pipeline.prompt, max_length=pipeline.max_length,
                     append_eos=False)
    return _Source(model, spec, pipeline=pipeline)


def load_embedder(
    model: str | None,
    adapter: str | Path | None = None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    **spec_overrides: object,
) -> Embedder:
    """The Embedder of a model name or folder, optionally with a training run or adapter folder as ``adapter``
    (``model`` may then be None: a run names its base model). What each kind of folder loads as: the module
    docstring; ``spec_overrides`` win over the spec it comes with. ``sources`` is set to the model folder (or hub id)
    and the adapter folder its weights were read from."""
    device = device or resolve_device()
    dtype = dtype or best_dtype(device)
    found = _source(model, adapter, allow_pickle)
    spec = dataclasses.replace(found.spec, **spec_overrides) if spec_overrides else found.spec
    sources = (models.resolve(found.model), *([str(found.adapter)] if found.adapter is not None else []))
    if found.onnx is not None:
        onnx_model.require()
        embedder = onnx_model.OnnxEmbedder(found.onnx, spec)
    else:
        pipeline = found.pipeline
        head = pipeline.head(allow_pickle) if pipeline else None  # its refusals before the model loads
        net, tokenizer = models.load(found.model, dtype=dtype, trust_remote_code=trust_remote_code,
                                     allow_pickle=allow_pickle, device=device)
        if found.adapter is not None:
            from peft import PeftModel  # here: a plain model's evaluation does not pay peft's import

            net = PeftModel.from_pretrained(net, str(found.adapter)).merge_and_unload()
        if pipeline is not None and pipeline.lower_case:
            st_pipeline.lowercase(tokenizer)
        embedder = Embedder(net.to(device).eval(), tokenizer, spec, head=head,
                            include_prompt=pipeline.include_prompt if pipeline else True)
    embedder.sources = sources
    return embedder
