"""Masked next-token prediction (MNTP), LLM2Vec's first adaptation stage (adapt.py); a stage objective, not a
``train.loss``.

Inputs: the causal LM's ``logits`` [B, L, V] of a batch whose chosen tokens were masked (BERT-style), and ``labels``
[B, L]: the original token at each masked position, -100 elsewhere (transformers' DataCollatorForLanguageModeling).
The token at masked position ``i`` is predicted from the output at position ``i - 1``, as the decoder was
pre-trained to predict the next token:

    loss = mean over {(b, i) : i >= 1, labels[b, i] != -100} of CE(logits[b, i - 1], labels[b, i])

A masked token at position 0 has no position before it and is left out; unmasked positions contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position that is not predicted (transformers' and torch's convention)


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of the logits at ``i - 1`` against the masked labels at ``i`` (module docstring), in
    float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
