"""Packed batches: the same vectors and gradients as padded ones, on every architecture packing is allowed for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_gradcache import TEXTS, _loss
from transformers import AutoModel, AutoTokenizer, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from slmembed import packing, pooling
from slmembed.embedder import PACKED_TOKENS, Embedder, batching
from slmembed.errors import SlmembedError
from slmembed.gradcache import cached_backward
from slmembed.spec import EmbedSpec

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
MORE = {  # architectures packing allows beyond conftest's tiny Gemma, Phi and Llama
    "gemma3_text": Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=8, sliding_window=16,
                                    layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=10),
    "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2),
    "mistral": MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
}


def _model(folder_or_config, tokenizer, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    if isinstance(folder_or_config, str):
        return AutoModel.from_pretrained(folder_or_config, dtype=torch.float32, attn_implementation=attn)
    config = folder_or_config.__class__(**{**folder_or_config.to_dict(), "vocab_size": len(tokenizer),
                                           "pad_token_id": tokenizer.eos_token_id, "use_cache": False})
    return AutoModel.from_config(config, attn_implementation=attn)


@pytest.fixture(params=["gemma", "phi", "llama", *MORE])
def arch_model(request, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[request.param]) if request.param in tiny_models else MORE[request.param]
    return request.param, source, tokenizer


def test_collate_packs_without_padding() -> None:
    batch = packing.collate([[5, 6, 7], [8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 6] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 3


def test_pool_of_packed_rows() -> None:
    hidden = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    torch.testing.assert_close(pooling.packed(hidden, cu, "last"), hidden[[2, 3, 5]])
    torch.testing.assert_close(pooling.packed(hidden, cu, "cls"), hidden[[0, 3, 4]])
    torch.testing.assert_close(pooling.packed(hidden, cu, "mean"),
                               torch.stack([hidden[:3].mean(0), hidden[3], hidden[4:].mean(0)]))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_vectors_equal_padded_ones(arch_model, pooling: str) -> None:
    arch, source, tokenizer = arch_model
    spec = EmbedSpec(pooling=pooling, max_length=16)
    padded = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=False)
    packed = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=True)
    assert padded.causal and not padded.packed and packed.packed
    assert len(packed.chunks(packed.tokenize(TEXTS), 60)) > 2  # several packed rows of several sequences
    want = padded.encode(TEXTS, batch_size=5)
    got = packed.encode(TEXTS, batch_size=24, max_tokens=60)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=arch)


def test_packed_batches_are_bounded_by_tokens_alone(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    spec = EmbedSpec(max_length=16)
    padded = Embedder(_model(str(tiny_models["llama"]), tokenizer).eval(), tokenizer, spec, packed=False)
    packed = Embedder(_model(str(tiny_models["llama"]), tokenizer).eval(), tokenizer, spec, packed=True)
    assert batching(packed) == (None, PACKED_TOKENS)  # any number of texts: a packed batch costs its tokens
    assert batching(padded) == (64, 64 * 32) and batching(packed, 8) == (8, 8 * 32)  # the CPU's cap, or the user's
    ids = packed.tokenize(TEXTS * 4)
    chunks = packed.chunks(ids, 120)
    assert max(map(len, chunks)) > 2 * max(map(len, packed.chunks(ids, 120, 8))) and len(chunks) > 2
    assert all(sum(len(ids[i]) for i in chunk) <= 120 for chunk in chunks)
    np.testing.assert_allclose(packed.encode(TEXTS, batch_size=None, max_tokens=120),
                               padded.encode(TEXTS, batch_size=5), atol=2e-5)
    with pytest.raises(ValueError, match="batch_size, max_tokens or both"):
        packed.encode(TEXTS, batch_size=None)


def test_packed_gradcache_gives_the_padded_loss_and_lora_gradients(arch_model) -> None:
    arch, source, tokenizer = arch_model
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(_model(source, tokenizer), lora).train()
        embedder = Embedder(model, tokenizer, EmbedSpec(max_length=16), packed=packed)
        ids = embedder.tokenize(TEXTS)
        loss = (cached_backward(embedder, ids, 60, _loss) if packed else _loss(embedder.forward_ids(ids, 64)))
        if not packed:
            loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=0)
    for name, grad in grads_padded.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_packing_is_refused_where_it_would_be_wrong(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    capped = _model(Gemma2Config(**SMALL, num_key_value_heads=1, head_dim=8), tokenizer, "eager")  # soft-capping
    windowed = _model(MORE["gemma3_text"], tokenizer)  # a 16-token sliding window
    assert not packing.supported(capped, 16) and not packing.supported(windowed, 17)
    assert packing.supported(windowed, 16)
    assert packing.unsupported(capped, 16) == ("its architecture 'gemma2' is not one of gemma, gemma3_text, llama, "
                                               "mistral, phi, qwen2")
    with pytest.raises(SlmembedError, match=r"train.packing=true, but this model cannot run packed batches: its "
                                            r"sliding window \(16 tokens\) is shorter than max_length \(32\)"):
        Embedder(windowed, tokenizer, EmbedSpec(max_length=32), packed=True)
    cpu = Embedder(_model(MORE["qwen2"], tokenizer), tokenizer, EmbedSpec())
    assert not cpu.packed  # by default only where it is fast: on a GPU


def test_packed_on_smollm2(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    padded = Embedder(_model(str(smollm2_dir), tokenizer).eval(), tokenizer, EmbedSpec(), packed=False)
    packed = Embedder(_model(str(smollm2_dir), tokenizer).eval(), tokenizer, EmbedSpec(), packed=True)
    got, want = packed.encode(TEXTS, max_tokens=200), padded.encode(TEXTS)
    assert (got * want).sum(1).min() > 0.99999


def test_an_unpacked_embedder_switches_attention_back(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = _model(str(tiny_models["llama"]), tokenizer).eval()
    packed = Embedder(model, tokenizer, EmbedSpec(), packed=True)
    assert model.config._attn_implementation == packing.NAME
    with pytest.raises(RuntimeError, match="packed batches only"):
        model(input_ids=torch.tensor([[5, 6]]))
    want = packed.encode(TEXTS[:4])
    np.testing.assert_allclose(Embedder(model, tokenizer, EmbedSpec(), packed=False).encode(TEXTS[:4]), want, atol=2e-5)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attends_within_each_sequence(causal: bool) -> None:
    """The block-diagonal reference is each sequence's own attention: causal, or bidirectional (attention.py)."""
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=causal,
                                                     scale=0.3).transpose(0, 1)
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])
    torch.testing.assert_close(packing._reference(q, k, v, cu, 0.3, causal), want)
    if not causal:
        assert not torch.allclose(packing._reference(q, k, v, cu, 0.3), want)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attn_of_either_release_is_called_with_the_mask_and_scale(causal: bool) -> None:
    """torch's varlen_attn took ``is_causal`` and no ``scale`` in one release, ``window_size`` and ``scale`` later
    (``(-1, 0)``: causal, ``(-1, -1)``: no window at all, i.e. bidirectional)."""
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = packing._reference(q, k, v, cu, 0.3, causal)

    def old(query, key, value, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal is causal and max_q == max_k == 5
        return packing._reference(query, key, value, cu_q, query.shape[-1] ** -0.5, is_causal)

    def new(query, key, value, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert window_size == ((-1, 0) if causal else (-1, -1))
        return packing._reference(query, key, value, cu_q, scale, window_size[1] == 0)

    for release in (old, new):
        torch.testing.assert_close(packing._adapt(release, causal)(q, k, v, cu, 5, 0.3), want)
    if causal:
        torch.testing.assert_close(packing._adapt(new)(q, k, v, cu, 5, 0.3), want)  # causal by default
