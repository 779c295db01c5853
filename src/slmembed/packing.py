"""Packed batches for decoders: a chunk's sequences end to end in one row, with no padding at all.

N token-id lists of lengths L_1..L_N become ``input_ids`` [1, T] with T = sum L_i, position ids that restart at 0
for every sequence, and cumulative lengths ``cu = [0, L_1, L_1 + L_2, ..., T]``. Every layer but attention works
token by token, so only real tokens are computed. Attention runs per sequence, blind to its neighbours, and causal
unless the model was made bidirectional (attention.py), by one of three kernels (the recipe's
``train.packed_attention``), each with or without the causal triangle inside a sequence:

* ``varlen``: variable-length FlashAttention (``torch.nn.attention.varlen``) on the GPU, one tile per sequence;
* ``flex``: FlexAttention (``torch.nn.attention.flex_attention``) over 128-token tiles of the whole row, with a
  document mask that the kernel reads block by block, skipping the tiles no query of which sees any key. Short
  sequences then share a tile (about seven of batch 512's 18-token ones) instead of each filling one of their own.
  The mask is built once per forward (``hidden_states``), for every layer, from ``cu``; the row is padded to a
  multiple of the tile with a filler sequence that attends only to itself (no row without a key, so no NaN) and whose
  outputs are dropped. On the GPU the kernel is compiled (``torch.compile``; inside a compiled block, the block's
  compile takes it in), else it runs unfused;
* ``flex64``: the same with 64-token tiles (on the GPU the kernel's blocks set to match): less of each computed tile
  is masked away where sequences are short, at the price of smaller matrix products (32-token tiles were tried: with
  Gemma-3's head size of 256, Inductor finds no configuration for the backward);
* the explicit block-diagonal mask (``_reference``, which the tests compare against) wherever neither is asked or
  runs: ``auto`` is ``varlen`` where it runs, this elsewhere.

Sequence i's last token is row ``cu[i+1] - 1``.

transformers reaches this attention through its attention interface, under the name ``slmembed_packed``. That name
has no mask function, so transformers builds no mask for it either: its mask builder otherwise checks the position
ids for packing with a host read, which stalls the CPU on the GPU twice per forward.

Packing is for architectures whose attention goes through that interface and whose positions come from
``position_ids`` (``ARCHITECTURES``, each tested against the padded forward), without attention logit soft-capping,
attention dropout or a sliding window shorter than the longest input (for a bidirectional Gemma-3, the window the
config derives for it: attention.py).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from slmembed import attention as attention_mode
from slmembed.errors import SlmembedError

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # a torch without FlexAttention: ``check`` refuses flex
    BlockMask = flex_attention = None

NAME = "slmembed_packed"
TILE = 128  # tokens of FlexAttention's query and key blocks: the block mask's granularity and the row's padding
FLEX_TILES = {"flex": TILE, "flex64": 64}  # train.packed_attention's FlexAttention kernels' tiles
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")  # flex's kernel blocks, fwd and bwd
_KERNELS: dict = {}  # causal (bool) -> the GPU kernel ``attention`` calls (see ``_varlen``), set by ``use``
_FLEX = "_slmembed_flex"  # on the transformers model, set by ``use``: None, or flex's mask's (causality, tile)
ARCHITECTURES = frozenset({"llama", "gemma", "gemma3_text", "phi", "qwen2", "mistral"})


def _pretrained(model: torch.nn.Module) -> PreTrainedModel | None:
    """The outermost transformers model inside ``model`` (which may be wrapped by PEFT or DDP), if any."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def supported(model: torch.nn.Module, max_length: int) -> bool:
    """Whether ``model`` can run packed batches of sequences up to ``max_length`` tokens (see the module doc)."""
    return unsupported(model, max_length) is None


def unsupported(model: torch.nn.Module, max_length: int) -> str | None:
    """Why ``model`` cannot run packed batches of sequences up to ``max_length`` tokens, or None if it can."""
    base = _pretrained(model)
    if base is None:
        return f"{type(model).__name__} is not a transformers model"
    config = base.config
    window = getattr(config, "sliding_window", None)
    if config.model_type not in ARCHITECTURES:
        return f"its architecture {config.model_type!r} is not one of {', '.join(sorted(ARCHITECTURES))}"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps its attention logits"
    if getattr(config, "attention_dropout", 0.0):
        return f"it has attention dropout ({config.attention_dropout})"
    if window is not None and window < max_length:
        return f"its sliding window ({window} tokens) is shorter than max_length ({max_length})"
    return None


def fast(model: torch.nn.Module, kernel: str = "auto") -> bool:
    """Whether packing pays for ``model``: a bf16/fp16 model on a GPU, with variable-length FlashAttention (``auto``,
    ``varlen``) or FlexAttention (``flex``)."""
    weight = next(model.parameters())
    if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)):
        return False
    if kernel in FLEX_TILES:
        return flex_attention is not None
    return _varlen(attention_mode.is_causal(model)) is not None


def check(kernel: str, device: torch.device, training: bool = True) -> None:
    """Refuse, in one line and before anything loads, a packed-attention ``kernel`` that cannot run on ``device``
    (``training``: with its backward)."""
    field = f"train.packed_attention: {kernel}"
    if kernel == "varlen" and device.type != "cuda":
        raise SlmembedError(f"{field} is variable-length FlashAttention, on a GPU; this run is on the {device.type}: "
                            "set train.packed_attention=auto")
    if kernel == "varlen" and _varlen_attn() is None:
        raise SlmembedError(f"{field} needs torch.nn.attention.varlen, which torch {torch.__version__} lacks: set "
                            "train.packed_attention=auto")
    if kernel in FLEX_TILES and flex_attention is None:
        raise SlmembedError(f"{field} needs torch.nn.attention.flex_attention, which torch {torch.__version__} lacks: "
                            "set train.packed_attention=auto")
    if kernel in FLEX_TILES and training and not _flex_trains(device.type):
        raise SlmembedError(f"{field}: torch {torch.__version__} has no FlexAttention backward on the {device.type}: "
                            "set train.packed_attention=auto, or train on a GPU")


def use(model: torch.nn.Module, packed: bool, kernel: str = "auto") -> None:
    """Route ``model``'s attention through ``attention`` (every forward must then be given a packed batch) with
    ``kernel`` (``train.packed_attention``: auto, varlen, flex or flex64), or, if it was, back to the
    implementation it had before."""
    base = _pretrained(model)
    if base is None:
        return
    if packed:  # resolved here, for the model's attention: compiled code must not trace the probe behind it
        causal = attention_mode.is_causal(model)
        _KERNELS[causal] = _varlen(causal)
        device = next(model.parameters()).device
        check(kernel, device, training=False)
        if kernel == "varlen" and not _KERNELS[causal]:
            raise SlmembedError("train.packed_attention: varlen disagrees with the reference on this GPU (packing.py): "
                                "set train.packed_attention=auto")
        setattr(base, _FLEX, (causal, FLEX_TILES[kernel]) if kernel in FLEX_TILES else None)
    current = base.config._attn_implementation
    if packed and current != NAME:
        base._slmembed_unpacked_attention = current
        base.config._attn_implementation = NAME
    elif not packed and current == NAME:
        base.config._attn_implementation = getattr(base, "_slmembed_unpacked_attention", "sdpa")


def collate(ids: Sequence[list[int]]) -> dict:
    """The packed inputs of token id lists: input_ids and position_ids [1, T], cu_seq_lens [N+1], max_length."""
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(ends[-1]))
    positions = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
    return {"input_ids": torch.from_numpy(flat)[None], "position_ids": torch.from_numpy(positions)[None],
            "cu_seq_lens": torch.from_numpy(np.concatenate([[0], ends]).astype(np.int32)),
            "max_length": int(lengths.max())}


class Documents(NamedTuple):
    """FlexAttention's mask of a packed row: which tiles hold a query that sees a key, and for which causality."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    causal: bool


def hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The last layer's hidden states [T, D] of a packed batch (already on the model's device)."""
    ids, positions, cu, longest = batch["input_ids"], batch["position_ids"], batch["cu_seq_lens"], batch["max_length"]
    tokens, extra = ids.shape[1], {}
    flex = getattr(_pretrained(model), _FLEX, None)
    if flex is not None:
        causal, tile = flex
        filler = -tokens % tile
        if filler:  # a sequence of its own, of token 0 at position 0 (any will do: its outputs are dropped)
            ids, positions = F.pad(ids, (0, filler)), F.pad(positions, (0, filler))
            cu = torch.cat([cu, cu.new_full((1,), tokens + filler)])
        extra["documents"] = document_mask(cu, tokens + filler, causal, tile)
    out = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                max_length_k=longest, **extra)
    return out.last_hidden_state[0, :tokens]


def document_mask(cu: torch.Tensor, length: int, causal: bool, tile: int = TILE) -> Documents:
    """FlexAttention's block mask, in ``tile``-token tiles, of a packed row of ``length`` tokens (``cu[-1]``, a
    multiple of ``tile``): a query sees the keys of its own sequence, the earlier ones only if ``causal``.

    Built tile by tile from ``cu``, not by ``create_block_mask``, which evaluates the mask for every (query, key)
    pair, [T, T] (27k tokens at batch 512: 0.75 GB and several passes a forward). Sequences are contiguous, so a tile
    pair holds a visible pair iff the sequence ranges of its two tiles overlap (and, causal, the key tile is not after
    the query tile), and every pair is visible iff both tiles lie in one sequence (causal: off the diagonal). The tiles
    equal ``create_block_mask``'s (tests/test_flex.py)."""
    with torch.profiler.record_function("packing.document_mask"):  # its cost a step, in a profile's operator table
        document = torch.searchsorted(cu[1:].long(), torch.arange(length, device=cu.device), right=True)
        first, last = document[::tile], document[tile - 1 :: tile]  # each tile's first and last sequence
        q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
        seen = (q_first <= k_last) & (k_first <= q_last)
        full = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
        if causal:
            tiles = torch.arange(len(first), device=cu.device)
            seen &= tiles[None, :] <= tiles[:, None]
            full &= tiles[None, :] < tiles[:, None]
        partial = seen & ~full

        def blocks(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Per query tile: how many key tiles, and their indices first, ascending."""
            order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True)
            return which.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

        def same(b, h, q, k):
            return document[q] == document[k]

        def same_causal(b, h, q, k):
            return (document[q] == document[k]) & (q >= k)

        mask = BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=tile,
                                        mask_mod=same_causal if causal else same, seq_lengths=(length, length))
    return Documents(mask, causal)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
              is_causal: bool | None = None, documents: Documents | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, D] and key/value [1, H_kv, T, D] -> output [1, T, H, D].

    Causal as transformers' own kernels decide it: the ``is_causal`` keyword (the config's, attention.py) if given,
    else the module's flag. With ``documents`` (``hidden_states`` passes them for ``flex``), FlexAttention."""
    if cu_seq_lens_q is None:
        raise RuntimeError(f"the {NAME} attention runs packed batches only (packing.collate): no cu_seq_lens_q given")
    if dropout:
        raise RuntimeError(f"the {NAME} attention has no attention dropout (got {dropout})")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if documents is not None:
        if documents.causal != causal:
            raise RuntimeError(f"the {NAME} attention's block mask is for causal={documents.causal}, this layer is "
                               f"causal={causal}")
        return _flex(query, key, value, documents.block_mask, scaling), None
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    kernel = _KERNELS.get(causal) if q.is_cuda else None
    if kernel:
        out = kernel(q, k, v, cu_seq_lens_q, max_length_q, scale)
    else:
        out = _reference(q, k, v, cu_seq_lens_q, scale, causal)
    return out.unsqueeze(0), None


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float,
               causal: bool = True) -> torch.Tensor:
    """Packed attention with an explicit [T, T] mask: a token sees the tokens of its own sequence, the earlier ones
    only if ``causal``."""
    position = torch.arange(q.shape[0], device=q.device)
    segment = torch.searchsorted(cu[1:].long(), position, right=True)
    allowed = segment[:, None] == segment[None, :]
    if causal:
        allowed &= position[:, None] >= position[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         scale=scale)
    return out.transpose(0, 1)


def _flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, scale: float | None) -> torch.Tensor:
    """FlexAttention of [1, H, T, D] queries and [1, H_kv, T, D] keys and values (grouped-query attention where
    H_kv < H) under ``block_mask``: [1, T, H, D]. Compiled on the GPU, unless already inside compiled code; there,
    a mask's tiles smaller than ``TILE`` set the kernel's blocks (forward and backward) to the tile, since torch's
    default blocks (up to 128) must divide it."""
    flex = _compiled_flex() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    tile = block_mask.BLOCK_SIZE[0]
    options = dict.fromkeys(_BLOCKS, tile) if query.is_cuda and tile < TILE else None
    out = flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1],
               kernel_options=options)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    """``flex_attention`` compiled once for the process: uncompiled, it computes every query-key score."""
    return torch.compile(flex_attention)


def _flex_trains(device: str) -> bool:
    """Whether FlexAttention runs forward and backward on ``device`` (torch refuses its backward on some devices):
    tried on one tile."""
    probe = torch.zeros(1, 1, TILE, 8, device=device, requires_grad=True)
    try:
        flex_attention(probe, probe, probe).sum().backward()
    except NotImplementedError:
        return False
    return True


def _varlen_attn():
    """torch's ``varlen_attn``, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen(causal: bool = True):
    """``_adapt(varlen_attn, causal)`` for this PyTorch, or None where ``torch.nn.attention.varlen`` is missing or
    where, on this GPU, its forward and backward do not match the reference on a small probe."""
    varlen_attn = _varlen_attn()
    if varlen_attn is None:
        return None
    call = _adapt(varlen_attn, causal)
    return call if torch.cuda.is_available() and _agrees(call, causal) else None


def _adapt(varlen_attn, causal: bool = True):
    """``f(q, k, v, cu, max_length, scale)``: ``varlen_attn``, causal or not, whatever its release's arguments
    (``is_causal`` became ``window_size``, -1 meaning unbounded; without a ``scale`` argument the query is scaled
    instead)."""
    params = inspect.signature(varlen_attn).parameters
    mask = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    takes_scale = "scale" in params

    def call(q, k, v, cu, max_length, scale):
        if takes_scale:
            return varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scale, **mask)
        return varlen_attn(q * (scale * q.shape[-1] ** 0.5), k, v, cu, cu, max_length, max_length, **mask)

    return call


def _agrees(call, causal: bool = True) -> bool:
    """Whether ``call`` gives the reference's (causal or not) outputs and gradients on a three-sequence probe."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(11, 2, 64, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, 3, 4, 11], device="cuda", dtype=torch.int32)
    try:
        got = torch.autograd.grad(call(q, k, v, cu, 7, 0.1).float().square().sum(), (q, k, v))
    except RuntimeError as exc:
        warnings.warn(f"variable-length attention fails here ({exc}); batches stay padded", stacklevel=3)
        return False
    want = torch.autograd.grad(_reference(q, k, v, cu, 0.1, causal).float().square().sum(), (q, k, v))
    if all(torch.allclose(a.float(), b.float(), rtol=0.05, atol=0.05) for a, b in zip(got, want, strict=True)):
        return True
    warnings.warn("variable-length attention disagrees with the reference here; batches stay padded", stacklevel=3)
    return False


AttentionInterface.register(NAME, attention)
