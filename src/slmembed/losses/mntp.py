"""Masked next-token prediction (MNTP), LLM2Vec's first adaptation stage (adapt.py); a stage objective, not a
``train.loss``.

Inputs: ``labels`` [B, L] of a batch whose chosen tokens were masked (BERT-style): the original token at each masked
position, -100 elsewhere (transformers' DataCollatorForLanguageModeling); and the causal LM's ``logits``, either
[B, L, V] at every position or [M, V] at the M positions ``predictors(labels)`` marks, in row-major order (the LM head
run on those positions only: a fifth of the tokens at 20% masking, which matters with a vocabulary of 262k). The token
at masked position ``i`` is predicted from the output at position ``i - 1``, as the decoder was pre-trained to predict
the next token:

    loss = mean over {(b, i) : i >= 1, labels[b, i] != -100} of CE(logits[b, i - 1], labels[b, i])

A masked token at position 0 has no position before it and is left out; unmasked positions contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position that is not predicted (transformers' and torch's convention)


def predictors(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions whose output predicts a masked token (each one before a masked position)."""
    marked = torch.zeros_like(labels, dtype=torch.bool)
    marked[:, :-1] = labels[:, 1:] != IGNORE
    return marked


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of the logits at ``i - 1`` against the masked labels at ``i`` (module docstring), in
    float32; ``logits`` at every position [B, L, V] or at the ``predictors`` only [M, V]."""
    if logits.dim() == 3:
        logits = logits[predictors(labels)]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    return F.cross_entropy(logits.float(), targets)
