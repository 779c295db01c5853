"""An embedding model as one ONNX graph, run by onnxruntime (``slmembed export --format onnx``), and its int8 variant.

The graph takes ``input_ids`` and ``attention_mask`` [batch, tokens] (int64, padded on the right: the export
tokenizer's side) and returns ``sentence_embedding`` [batch, D]: the backbone, the run's pooling (pooling.padded) and
the L2 normalisation, in float32, so a consumer needs only the tokenizer and onnxruntime. It is written by torch's
own exporter (``torch.onnx.export(dynamo=True)``: torch.export, then onnxscript's translation and optimiser) with
batch and tokens dynamic; optimum's exporter is not used because its ONNX package pins transformers below 4.58.
``quantize_int8``: onnxruntime's dynamic quantisation (int8 weights per output channel for the matrix products but
the MLP's down projection, activations quantised at run time), for the CPU.

``OnnxEmbedder`` is an Embedder (same tokenisation, length-sorted batches, input order) whose forward runs the graph
in an onnxruntime session on the CPU, so ``loading.load_embedder`` gives one for an ONNX export folder and eval, embed
and serve use it like any other model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from slmembed import models, pooling
from slmembed.embedder import Embedder, template_tail
from slmembed.errors import SlmembedError
from slmembed.run import EmbedInfo
from slmembed.spec import EmbedSpec

FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"


def require() -> None:
    """Fail with one line where the ONNX packages are missing (they are the ``onnx`` extra)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise SlmembedError(f"ONNX export needs {', '.join(missing)}: bash scripts/install.sh all "
                            "(or pip install 'slmembed[onnx]')")


class _Pooled(torch.nn.Module):
    """The backbone followed by pooling and normalisation: what the graph computes."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(pooling.padded(hidden, attention_mask, self.pooling).float(), dim=-1)


def export_graph(embedder: Embedder, path: Path) -> None:
    """Write ``embedder``'s model (float32, on the CPU) with its pooling as an ONNX graph at ``path``."""
    module = _Pooled(embedder.model, embedder.spec.pooling).eval()
    sample = embedder.collate(embedder.tokenize(["A man is playing a guitar.", "Hi"]))
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    program = torch.onnx.export(module, (sample["input_ids"], sample["attention_mask"]), input_names=list(INPUTS),
                                output_names=[OUTPUT], dynamo=True, verbose=False,
                                dynamic_shapes={name: {0: batch, 1: tokens} for name in INPUTS})
    program.save(str(path))


def quantize_int8(source: Path, target: Path, inner: int | None = None) -> None:
    """``source``'s graph with int8 weights (onnxruntime's dynamic quantisation, per output channel) at ``target``.

    Only products with a constant weight are quantised, and not those taking ``inner`` inputs (the MLP's down
    projection, whose input carries a decoder's outlier activations: quantised on the fly to one int8 scale per
    tensor, they cost the demo SmolLM2-135M 3.2 points on STSBenchmark dev, against 0.9 without them)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    down = [n.name for n in graph.node if n.op_type == "MatMul" and inner and dims.get(n.input[1], [0])[0] == inner]
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=down,
                     extra_options={"MatMulConstBOnly": True})


class OnnxEmbedder(Embedder):
    """An Embedder over an ONNX export folder (its tokenizer, ``model.onnx`` and ``spec``, which the folder's saved
    spec gives: run.EmbedInfo), on the CPU."""

    def __init__(self, folder: str | Path, spec: EmbedSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        options = ort.SessionOptions()
        # As many threads as torch computes with (the process's share of the cores, e.g. under pytest-xdist), not
        # onnxruntime's one per core, whose threads spin while they wait and take the CPU from the other processes.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(folder / FILE), options, providers=["CPUExecutionProvider"])
        self.model, self.spec = None, spec
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        models.give_pad_token(self.tokenizer)
        self.tokenizer.padding_side = "right"  # the graph's positions start at 0: no left padding
        self.eos = self.tokenizer.eos_token_id if spec.append_eos else None
        self.tail = template_tail(self.tokenizer, spec)
        self.causal, self.packed = False, False  # collate keeps the mask, which the graph always takes
        info = EmbedInfo.read(folder)  # none yet while the export checks it
        self._weights = f"onnx {(info and info.quantize) or 'float32'}"
        self._vocab = min(len(self.tokenizer), json.loads((folder / "config.json").read_text())["vocab_size"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def weights(self) -> str:
        return self._weights

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {name: np.ascontiguousarray(batch[name].numpy()) for name in INPUTS}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])
