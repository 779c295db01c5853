"""Pooling: how a model's hidden states become one vector per text, and the names other tools give it.

The poolings (``spec.POOLINGS``, which recipes and the command line check against):

* ``last``: the last layer's hidden state at the last real token, ``h[i, L_i]`` with ``L_i`` the index of the last
  position whose attention mask is 1 (correct for left and right padding alike); for decoders the EOS that the
  embedder appends;
* ``mean``: ``sum_t m_it h_it / sum_t m_it`` over the real tokens;
* ``cls``: the first real token's.

``padded`` pools a padded batch [B, T, D] with its attention mask, ``packed`` a packed batch [T, D] with its cumulative
lengths (packing.py); both are hand-written (a few tensor operations) because they run inside every training step,
CUDA graph and ONNX export, where sentence-transformers' ``Pooling`` module cannot. ``TO_ST`` and ``FROM_ST`` translate
to and from sentence-transformers' ``Pooling`` modes (``LEGACY_MODES``: the flags its configs before v6 saved), and
``PHRASES`` says each in a model card's words.
"""

from __future__ import annotations

import torch

TO_ST = {"last": "lasttoken", "mean": "mean", "cls": "cls"}  # slmembed's name -> sentence-transformers' mode
FROM_ST = {mode: name for name, mode in TO_ST.items()}
LEGACY_MODES = {  # sentence-transformers < 6 saved one flag per mode, in this order of precedence
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken"}
PHRASES = {"last": "the last layer's hidden state at the EOS token the tokenizer appends",
           "mean": "the mean of the last layer's hidden states", "cls": "the first token's hidden state"}


def padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool hidden states [B, T, D] with attention mask [B, T] into [B, D] (see the module docstring)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    idx = mask.shape[1] - 1 - mask.flip(1).int().argmax(1) if pooling == "last" else mask.int().argmax(1)
    return hidden[rows, idx]


def packed(hidden: torch.Tensor, cu: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """Pool packed hidden states [T, D] into [N, D]: each sequence's last token, first token or mean, leaving out
    its first ``skip`` tokens (a prompt's: embedder.Embedder) where it has more."""
    cu = cu.long()
    if pooling == "last":
        return hidden[cu[1:] - 1]
    lengths = cu.diff()
    if pooling == "cls":
        return hidden[cu[:-1] + skip * (lengths > skip)]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                      output_size=hidden.shape[0])
    sums = hidden.new_zeros((len(lengths), hidden.shape[1]), dtype=torch.float32)
    values = hidden.float()
    if skip:
        values = values * (torch.arange(hidden.shape[0], device=hidden.device) - cu[segment] >= skip)[:, None]
    return sums.index_add_(0, segment, values) / (lengths - skip).clamp(min=1)[:, None]
