"""On the GPU: which batch layouts give the embeddings of a decoder made bidirectional (and of the causal one)?

The reference is the plainest forward there is: one sentence at a time (no padding, no mask), eager attention, fp32
(SDPA for a run folder).
Against it, in bf16 as training runs: padded batches (SDPA with the padding mask), single sentences through SDPA,
and packed batches (variable-length FlashAttention). Prints the smallest cosine over STSBenchmark dev sentences.
A decoder switched to bidirectional attention without training for it is numerically fragile: on the CPU, in bf16,
SmolLM2-135M's single sentences already fall to a cosine of 0.69 against fp32 (causal: 0.998), so compare the
layouts with one another, not only with the reference. ``python bench/attention_check.py RUN_FOLDER`` checks a
trained run (its adapter merged) the same way.

    python bench/attention_check.py smollm2-135m gemma-3-270m
"""

from __future__ import annotations

import os
import sys

import torch

from slmembed import models
from slmembed.data.sts import load_sts
from slmembed.embedder import Embedder
from slmembed.loading import load_embedder
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec

dev = load_sts("STSBenchmark", split="dev")
texts = sorted({*dev.sentences1, *dev.sentences2})[::10]
cuda = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu: a dry run
for name in sys.argv[1:]:
    if RunDir.locate(name):
        eager = load_embedder(None, adapter=name, device=cuda, dtype=torch.float32)  # SDPA, fp32: no mask needed
        model = load_embedder(None, adapter=name, device=cuda, dtype=torch.bfloat16).model
        eager, tokenizer, specs = eager.model, eager.tokenizer, [eager.spec]
    else:
        eager, tokenizer = models.load(name, dtype=torch.float32, attn_implementation="eager", device=cuda)
        model, _ = models.load(name, dtype=torch.bfloat16, device=cuda)
        specs = [EmbedSpec(pooling=p, attention=a) for a, p in (("causal", "last"), ("bidirectional", "mean"),
                                                                 ("bidirectional", "last"))]
    for spec in specs:
        reference = Embedder(eager, tokenizer, spec, packed=False).encode(texts, batch_size=1)
        got = {"padded": Embedder(model, tokenizer, spec, packed=False).encode(texts, batch_size=64),
               "single": Embedder(model, tokenizer, spec, packed=False).encode(texts, batch_size=1)}
        packed = Embedder(model, tokenizer, spec, packed=None)
        got["packed" if packed.packed else "packed (not supported: padded)"] = packed.encode(texts, batch_size=64)
        cosines = {k: round(float((v * reference).sum(1).min()), 5) for k, v in got.items()}
        cosines["packed vs padded"] = round(float((got["padded"] * got.get("packed", got["padded"])).sum(1).min()), 5)
        print(f"{name} {spec.attention}/{spec.pooling}: min cosine to the eager fp32 reference {cosines}", flush=True)
