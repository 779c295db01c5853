"""Text -> L2-normalised vectors.

Each text is wrapped in the optional prompt template, tokenised (truncated to ``max_length`` tokens, EOS included), and
given an appended EOS token for last-token pooling. A truncated text keeps the template's text after ``{}`` (its
last tokens are overwritten with it), as sentence-transformers keeps a chat template's suffix, so that the prompt's
instruction still precedes the pooled token. Pooling (last token, mean or first token) is pooling.py's.

With left padding, position ids are ``cumsum(mask) - 1`` so that every sequence starts at position 0 whatever its
padding. ``encode`` sorts texts by length (within pieces of ``PIECE``) to keep padding small and returns
vectors in the input order.

Fast path for causal decoders: a token only attends to earlier tokens, so with padding on the right no real token
ever sees a pad token. Their batches are therefore padded on the right and run without an attention mask: the
hidden states of real tokens are the same as with the mask, and attention runs as one causal kernel (FlashAttention
through SDPA) instead of a masked one, with no mask to build. The mask is still used for pooling.

Bidirectional attention (``EmbedSpec.attention``, attention.py): every token sees the whole text, pad tokens too
unless masked, so those batches always carry the attention mask and are padded on the tokenizer's side (left or
right, both exact with the mask and the position ids above).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmembed import attention, models, packing, pooling, st_pipeline
from slmembed.errors import SlmembedError
from slmembed.spec import EmbedSpec

PIECE = 4096  # texts ``encode`` tokenises at a time
PACKED_TOKENS = 32_768  # real tokens in a packed batch (``batching``), as in a padded batch of 1,024 texts



def is_causal(model: torch.nn.Module) -> bool:
    """True if the model has attention modules and every one of them is causal (decoders; not BERT-like encoders,
    not decoders made bidirectional: attention.py)."""
    return attention.is_causal(model)


class Embedder:
    """Wraps a backbone and its tokenizer; ``forward`` keeps the graph (training), ``encode`` does not.

    ``packed``: run batches packed (packing.py); by default where that is supported and fast (decoders of the tested
    architectures in bf16 on a GPU). It switches the model's attention to packed attention, or back. ``kernel``: the
    packed attention's (the recipe's ``train.packed_attention``: auto, varlen or flex; packing.py); varlen or flex
    packs by default wherever packing is supported, and is refused where it is not.

    The model's self-attention is first made what ``spec.attention`` asks (``attention.use``): bidirectional, or
    causal, which undoes an earlier switch of this model to bidirectional and otherwise leaves it as loaded.

    ``head``: a module applied to the pooled vectors (float32) before they are normalised, on every path: a
    sentence-transformers folder's Dense layers (st_pipeline.py). ``include_prompt=False`` leaves the prompt's tokens
    (before ``{}`` in the spec's template) out of pooling, as sentence-transformers' Pooling of that name does.

    ``sources``: the model folders (or hub ids) its weights were read from, adapter last; ``loading.load_embedder``
    sets them.
    """

    sources: tuple[str, ...] = ()

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: EmbedSpec,
                 packed: bool | None = None, head: torch.nn.Module | None = None, include_prompt: bool = True,
                 kernel: str = "auto") -> None:
        self.model, self.tokenizer, self.spec, self.kernel = model, tokenizer, spec, kernel
        attention.use(model, spec.attention)  # before the fast path and packing, which depend on it
        self.causal = is_causal(model)  # the fast path of the module docstring
        self.eos = tokenizer.eos_token_id if spec.append_eos else None
        models.give_pad_token(tokenizer)  # a tokenizer given directly, not through models.load, may name none
        if spec.append_eos and self.eos is None:
            raise SlmembedError(f"{tokenizer.name_or_path}: append_eos needs an EOS token, and its tokenizer has none: "
                                "set model.append_eos=false (a model folder without sentence-transformers modules is "
                                "read as a decoder's, last token + EOS)")
        why_not = packing.unsupported(model, spec.max_length)
        if packed and why_not:
            raise SlmembedError(f"train.packing=true, but this model cannot run packed batches: {why_not}; set "
                                "train.packing=null (packed where supported) or false")
        if packed is None and kernel != "auto":  # a kernel asked for packs where packing is supported
            if why_not:
                raise SlmembedError(f"train.packed_attention: {kernel} is the attention of packed batches, which this "
                                    f"model cannot run: {why_not}; set train.packed_attention=auto")
            packed = True
        self.packed = why_not is None and packing.fast(model, kernel) if packed is None else packed
        packing.use(model, self.packed, kernel)
        self.head = None if head is None else head.to(self.device)
        self.skip = 0  # leading tokens of every text that pooling leaves out: the prompt's, if not included
        if spec.prompt and not include_prompt:
            self.skip = st_pipeline.prompt_tokens(tokenizer, spec.parts[0], spec.max_length)
        self.tail = template_tail(tokenizer, spec)  # what a truncated text keeps at its end

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weights(self) -> str:
        """What the model computes with, as result files record it (e.g. ``torch.bfloat16``)."""
        return str(next(self.model.parameters()).dtype)

    @property
    def vocab_size(self) -> int:
        """Token ids the model accepts: below its tokenizer's size and its embedding table's."""
        return min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: prompt applied, truncated so that the appended EOS still fits in ``max_length``, a
        truncated text ending in the template's tail (module docstring)."""
        room = self.spec.max_length - (self.eos is not None)
        texts = [self.spec.template.format(t) for t in texts] if self.spec.prompt else list(texts)
        ids = _fast_tokenize(self.tokenizer, texts, room)
        if ids is None:
            ids = self.tokenizer(texts, truncation=True, max_length=room, add_special_tokens=True)["input_ids"]
        if self.tail:
            for row in ids:
                if len(row) >= room:  # cut (or exactly full, when the tail is there already)
                    keep = min(len(self.tail), len(row))
                    row[-keep:] = self.tail[-keep:]
        if self.eos is None:
            return ids
        return [row + [self.eos] for row in ids]

    def collate(self, ids: Sequence[list[int]], multiple: int | None = None) -> dict:
        """Token id lists as model inputs: packed (``packing.collate``), or padded on the right for causal models and
        on the tokenizer's side for others, the width rounded up to a multiple of ``multiple``: by default 8 on a GPU
        (fewer shapes for its kernels to be chosen for) and 1 elsewhere, where compute follows the padded tokens (26%
        fewer on the nine STS sets, bench/NOTES.md)."""
        if self.packed:
            return packing.collate(ids)
        multiple = multiple or (8 if self.device.type == "cuda" else 1)
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        width = int(-(-lengths.max() // multiple) * multiple)
        left = self.tokenizer.padding_side == "left" and not self.causal
        cols = np.arange(width)
        real = cols >= (width - lengths)[:, None] if left else cols < lengths[:, None]
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id, dtype=np.int64)
        input_ids[real] = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
        if left:
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised embeddings [B, D] for a collated batch, with gradients if enabled."""
        batch = self.to_device(batch)
        if self.packed:
            pooled = pooling.packed(packing.hidden_states(self.model, batch), batch["cu_seq_lens"], self.spec.pooling,
                                    self.skip)
        else:
            inputs = {k: v for k, v in batch.items() if not (self.causal and k == "attention_mask")}
            mask = batch["attention_mask"]
            if self.skip:
                mask = mask * (mask.cumsum(1) > self.skip)
            pooled = pooling.padded(self.model(**inputs).last_hidden_state, mask, self.spec.pooling)
        pooled = pooled.float()
        return F.normalize(pooled if self.head is None else self.head(pooled), dim=-1)

    def to_device(self, batch: dict, into: dict | None = None) -> dict:
        """A collated batch's tensors on the model's device, without stalling the host: host tensors are copied from
        pinned memory, asynchronously; tensors already there stay as they are. With ``into`` (the same keys, tensors
        on the device: a recorded CUDA graph's inputs), every tensor is copied into those instead."""
        device = self.device

        def move(key: str, value):
            if not isinstance(value, torch.Tensor):
                return value
            if into is None and value.device == device:
                return value
            if device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory()
            if into is not None:
                return into[key].copy_(value, non_blocking=True)
            return value.to(device, non_blocking=True)

        return {k: move(k, v) for k, v in batch.items()}

    def chunks(self, ids: Sequence[list[int]], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
        """Split positions 0..N-1 into length-sorted chunks of at most ``max_tokens`` tokens (and ``max_rows``).

        Padded, a chunk costs its rows times its longest sequence, and sequences of similar length share a chunk,
        so little compute is spent on padding; packed, it costs the sum of its lengths.
        """
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out, start = [], 0
        while start < len(order):
            end, used = start + 1, len(ids[order[start]])
            while end < len(order) and (max_rows is None or end - start < max_rows):
                length = len(ids[order[end]])
                cost = used + length if self.packed else (end - start + 1) * length
                if cost > max_tokens:
                    break
                end, used = end + 1, cost
            out.append(order[start:end])
            start = end
        return out

    def forward_ids(self, ids: Sequence[list[int]], max_tokens: int = 4096,
                    max_rows: int | None = None) -> torch.Tensor:
        """Embeddings [N, D] (input order, with gradients) of token id lists, run as length-sorted chunks of at most
        ``max_tokens`` tokens (and ``max_rows`` sequences).

        The chunks' graphs stay alive for one backward over the whole batch.
        """
        return self._embed_chunks(ids, self.chunks(ids, max_tokens, max_rows))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int | None = 64, max_tokens: int | None = None,
               progress: bool = False) -> np.ndarray:
        """Normalised float32 embeddings [N, D] in input order.

        Texts are tokenised ``PIECE`` at a time, each piece while the model embeds the one before (the fast
        tokenizer leaves Python's lock while it works, so the GPU is not kept waiting on a whole input's tokenising:
        bench/NOTES.md). A piece's texts are length-sorted into batches of at most ``batch_size`` texts (None: any
        number) and, if given, ``max_tokens`` tokens, padded or, packed, real (a token budget keeps batches of short
        texts large and batches of long texts within memory).
        """
        if batch_size is None and max_tokens is None:
            raise ValueError("encode needs batch_size, max_tokens or both")
        budget = max_tokens or batch_size * self.spec.max_length
        pieces = [texts[start : start + PIECE] for start in range(0, len(texts), PIECE)]
        if not pieces:
            return np.empty((0, 0), dtype=np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="encode", unit="text")
        out = []
        with ThreadPoolExecutor(1) as worker:
            pending = worker.submit(self.tokenize, pieces[0])
            for index in range(len(pieces)):
                ids = pending.result()
                if index + 1 < len(pieces):
                    pending = worker.submit(self.tokenize, pieces[index + 1])
                out.append(self._embed_chunks(ids, self.chunks(ids, budget, batch_size), bar))
        if bar is not None:
            bar.close()
        return _to_numpy(torch.cat(out))

    def _embed_chunks(self, ids: Sequence[list[int]], chunks: list[list[int]], bar=None) -> torch.Tensor:
        """Embeddings of ``ids`` in input order, computed one chunk of positions at a time (``bar``: a tqdm bar
        advanced by each chunk's texts)."""
        out = []
        for chunk in chunks:
            out.append(self.forward(self.collate([ids[i] for i in chunk])))
            if bar is not None:
                bar.update(len(chunk))
        inverse = torch.from_numpy(np.argsort(np.concatenate(chunks)))
        return torch.cat(out)[inverse.to(out[0].device, non_blocking=True)]


def batching(embedder: Embedder, batch_size: int | None = None) -> tuple[int | None, int]:
    """Texts and tokens per batch (``encode``'s arguments). Packed (packing.py) with no ``batch_size`` given: any
    number of texts up to ``PACKED_TOKENS`` real tokens. A packed batch costs its tokens alone; capped at 1,024 texts
    as well, Gemma-3-270M's pass over the nine STS sets ran 28 batches instead of 13 and took 13% longer, while
    larger budgets were no faster (bench/NOTES.md). Otherwise ``batch_size`` texts (default 1024 on a GPU, 64 on the
    CPU) and 32 padded tokens a text on average, so that batches of long texts stay within memory."""
    if batch_size is None and embedder.packed:
        return None, PACKED_TOKENS
    batch_size = batch_size or (1024 if embedder.device.type == "cuda" else 64)
    return batch_size, 32 * batch_size


def _to_numpy(vectors: torch.Tensor) -> np.ndarray:
    """``vectors.cpu().numpy()``, from a GPU through pinned memory: a copy into pageable memory ran at 1.5 GB/s
    (46 ms of a 0.82 s encode of the nine STS sets, bench/NOTES.md); into pinned memory it runs at the bus's speed."""
    if vectors.device.type != "cuda":
        return vectors.cpu().numpy()
    host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
    return host.copy_(vectors).numpy()


def template_tail(tokenizer: PreTrainedTokenizerBase, spec: EmbedSpec) -> list[int]:
    """The token ids of the template's text after ``{}`` and of any special tokens the tokenizer appends itself (an
    exported tokenizer's EOS), as sentence-transformers derives a chat template's suffix
    (``Transformer._chat_template_suffix_ids``): the longest common tail of the template around two fillers that
    tokenise differently ("0" and "1 2 3 4"), so never a token that merges with the text. Empty without such text."""
    if not spec.parts[1]:
        return []
    first, second = (tokenizer(spec.template.format(filler))["input_ids"] for filler in ("0", "1 2 3 4"))
    count = 0
    for left, right in zip(reversed(first), reversed(second), strict=False):
        if left != right:
            break
        count += 1
    return first[len(first) - count:] if 0 < count < min(len(first), len(second)) else []


def _fast_tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], room: int) -> list[list[int]] | None:
    """``tokenizer(texts, truncation=True, max_length=room)["input_ids"]`` straight from a fast tokenizer's Rust
    backend, set up as that call sets it up (truncation, no padding, special tokens kept whole), or None for a
    tokenizer without one. Why: the call then turns each text's encoding into Python dicts one by one, which is two
    thirds of its time (1.08 s of the nine STS sets' 27,675 sentences against 0.39 s for the backend, 2 cores)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    setup = getattr(tokenizer, "set_truncation_and_padding", None)
    if backend is None or setup is None or not texts:
        return None
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    setup(padding_strategy=PaddingStrategy.DO_NOT_PAD, truncation_strategy=TruncationStrategy.LONGEST_FIRST,
          max_length=room, stride=0, pad_to_multiple_of=None, padding_side=None)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    # tokenizers >= 0.21 can skip the character offsets, which are half of Gemma-3's tokenising time
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=True)]
