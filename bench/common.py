"""What every benchmark needs: provenance, the GPU's measured matmul ceiling, and the sentence-transformers peer.

The peer is built the way its users would build it for this task: Transformer -> Pooling(lasttoken) -> Normalize,
bf16 weights, a PEFT LoRA adapter, MultipleNegativesRankingLoss with scale 20 (= temperature 0.05). Its tokenizer is
given what ``slmembed export`` gives an exported model's: it appends EOS itself and pads on the right, so both tools
see the same token ids (``check_same_tokens`` verifies it) at the same positions. (Carrying EOS as text gave other
ids for about a quarter of the sentences with transformers 5.17, and left padding shifts Gemma's positions.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from slmembed.atomic import write_json
from slmembed.cli import provenance
from slmembed.embedder import Embedder
from slmembed.export import export_tokenizer
from slmembed.report import read_log
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec


def save(path: str | Path, result: dict) -> None:
    write_json(path, {**result, "run": provenance(" ".join(["python", *sys.argv]))})
    print(f"wrote {path}")


def log_window(run_dir: Path, first: int, last: int) -> tuple[dict, float]:
    """A training run's log record at step ``last``, and the seconds between the records of ``first`` and ``last``."""
    log = {r["step"]: r for r in read_log(RunDir(run_dir).log)}
    return log[last], log[last]["elapsed_s"] - log[first]["elapsed_s"]


def matmul_ceiling_tflops(n: int = 8192, repeats: int = 50) -> float:
    """Measured bf16 matrix-product throughput of this GPU (TFLOP/s), the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def st_model(folder: str | Path, spec: EmbedSpec, dtype: torch.dtype = torch.bfloat16):
    """The peer: a sentence-transformers model with last-token pooling over ``folder``'s backbone."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    # Plain text in, hidden states out: without the pin, sentence-transformers 6 wraps the text of a model that has
    # a chat template (SmolLM2-Instruct) in that template.
    backbone = Transformer(str(folder), model_kwargs={"dtype": dtype}, max_seq_length=spec.max_length,
                           modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                           module_output_name="token_embeddings")
    tokenizer = getattr(backbone, "tokenizer", None) or backbone.processor
    if tokenizer.pad_token is None:  # as slmembed does (models.load): SmolLM2's GGUF tokenizer has no pad token
        tokenizer.pad_token = tokenizer.eos_token
    export_tokenizer(tokenizer, spec)
    pooling = Pooling(backbone.get_embedding_dimension(), pooling_mode="lasttoken")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(modules=[backbone, pooling, Normalize()], device=device)


def st_texts(texts: list[str], embedder: Embedder) -> list[str]:
    """The peer's inputs: each text in the prompt template (its tokenizer appends EOS)."""
    return [embedder.spec.template.format(t) for t in texts]


def check_same_tokens(model, embedder: Embedder, texts: list[str]) -> int:
    """How many of ``texts`` the peer tokenises differently from slmembed (0 expected)."""
    ours = embedder.tokenize(texts)
    theirs = model.tokenize(st_texts(texts, embedder))
    mask, ids = theirs["attention_mask"], theirs["input_ids"]
    return sum(ids[i][mask[i].bool()].tolist() != row for i, row in enumerate(ours))


class StEncoder:
    """Lets slmembed's evaluator score the peer: ``encode`` with the peer's own batching."""

    def __init__(self, model, embedder: Embedder, batch_size: int = 256) -> None:
        self.model, self.embedder, self.batch_size = model, embedder, batch_size
        self.device = model.device

    def encode(self, texts, batch_size: int | None = None, max_tokens: int | None = None,
               progress: bool = False) -> np.ndarray:
        return self.model.encode(st_texts(list(texts), self.embedder), batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
