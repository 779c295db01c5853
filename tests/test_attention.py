"""Bidirectional attention (attention.py): every token sees the whole text, padded or packed alike, in this process
and after a save and plain reload; switching back restores the pre-trained model exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_gradcache import TEXTS
from test_packing import MORE, SMALL, _model
from transformers import AutoModel, AutoTokenizer, Gemma3TextConfig

from slmembed import attention
from slmembed.config import ModelConfig
from slmembed.embedder import Embedder, is_causal
from slmembed.errors import SlmembedError
from slmembed.spec import EmbedSpec

ARCHS = ["gemma", "phi", "llama", *MORE]  # every architecture packing allows
# Gemma-3 whose sliding window matters: 8 tokens saved, 5 (|i - j| < 5) once bidirectional, inputs of up to 12.
GEMMA3_WINDOWED = Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=8, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=10)
BIDIRECTIONAL = EmbedSpec(attention="bidirectional", max_length=16)


@pytest.fixture(params=ARCHS)
def arch_model(request, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[request.param]) if request.param in tiny_models else MORE[request.param]
    return request.param, source, tokenizer


def _hidden(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).last_hidden_state


def _state(model) -> tuple:
    return (model.config.to_dict(), sorted(vars(model.config)),
            [(m.is_causal, getattr(m, "sliding_window", None)) for m in attention.modules(model)])


def test_a_token_sees_later_tokens_only_when_bidirectional_and_causal_restores(arch_model) -> None:
    arch, source, tokenizer = arch_model
    model = _model(source, tokenizer).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    changed = ids.clone()
    changed[0, -1] = 11
    before, state = _hidden(model, ids), _state(model)
    assert torch.equal(_hidden(model, changed)[0, :-1], before[0, :-1])  # causal: earlier tokens blind to the last
    assert is_causal(model)

    attention.use(model, "bidirectional")
    attention.use(model, "bidirectional")  # idempotent: the state saved is the pre-trained one
    assert not is_causal(model) and all(m.is_causal is False for m in attention.modules(model))
    both = _hidden(model, ids)
    assert not torch.allclose(_hidden(model, changed)[0, 0], both[0, 0], atol=1e-4), arch
    # The reference: the pre-trained model with an explicit 4-D mask that lets every token see every token.
    attention.use(model, "causal")
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    reference = _hidden(model, ids, attention_mask={"full_attention": full, "sliding_attention": full}
                        if arch == "gemma3_text" else full)
    torch.testing.assert_close(both, reference, atol=2e-5, rtol=1e-4)

    assert _state(model) == state and is_causal(model)
    assert torch.equal(_hidden(model, ids), before)  # exactly the pre-trained outputs again


def test_padding_either_side_and_packing_give_each_text_alone(arch_model) -> None:
    """Bidirectional: pads must be masked (no fast path), and a padded, packed or lone text gets the same vector."""
    arch, source, tokenizer = arch_model
    if arch == "gemma3_text":  # bidirectional, its 16-token window becomes |i - j| < 9: packing refuses 16 tokens
        with pytest.raises(SlmembedError, match="cannot run packed batches: its sliding window"):
            Embedder(_model(source, tokenizer), tokenizer, BIDIRECTIONAL, packed=True)
        source = Gemma3TextConfig(**{**source.to_dict(), "sliding_window": 32})
    for pooling in ("mean", "last"):
        spec = EmbedSpec(attention="bidirectional", max_length=16, pooling=pooling)
        right = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=False)
        assert not right.causal and not right.packed
        alone = np.concatenate([right.encode([t]) for t in TEXTS])  # one text, no padding: the mask-free kernel
        want_right = right.encode(TEXTS, batch_size=6)
        tokenizer.padding_side = "left"
        try:
            left = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=False)
            assert left.collate([[5], [5, 6, 7]])["input_ids"][0, -1] == 5  # really padded on the left
            want_left = left.encode(TEXTS, batch_size=6)
        finally:
            tokenizer.padding_side = "right"
        packed = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=True)
        assert len(packed.chunks(packed.tokenize(TEXTS), 60)) > 2  # several packed rows of several sequences
        got = packed.encode(TEXTS, batch_size=24, max_tokens=60)
        for name, vectors in (("right", want_right), ("left", want_left), ("packed", got)):
            np.testing.assert_allclose(vectors, alone, atol=2e-5, err_msg=f"{arch} {pooling} {name}")
        causal = Embedder(_model(source, tokenizer).eval(), tokenizer, EmbedSpec(max_length=16, pooling=pooling))
        assert np.abs(causal.encode(TEXTS) - alone).max() > 1e-3  # the switch changed the vectors


def test_gemma3_switch_is_embeddinggemma_config(tmp_path) -> None:
    """Gemma-3 switched in place computes what its native use_bidirectional_attention config computes (sliding
    layers: |i - j| < 8 // 2 + 1), saves that config, and reloads it so."""
    config = Gemma3TextConfig(**{**GEMMA3_WINDOWED.to_dict(), "vocab_size": 128})
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    native = AutoModel.from_config(Gemma3TextConfig(**{**config.to_dict(), "use_bidirectional_attention": True}),
                                   attn_implementation="sdpa").eval()
    native.load_state_dict(model.state_dict())
    assert native.config.sliding_window == 5
    attention.use(model, "bidirectional")
    assert model.config.sliding_window == 5 and model.config.use_bidirectional_attention
    assert not hasattr(model.config, "is_causal")  # masking_utils' own bidirectional window would differ
    assert [m.sliding_window for m in attention.modules(model)] == [5, None]
    ids = torch.arange(3, 15)[None]  # 12 tokens: the window matters
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(_hidden(model, ids, **kwargs), _hidden(native, ids, **kwargs), atol=0, rtol=0)
    # The window is real: the first token sees the fifth, not the sixth.
    later = [ids.clone(), ids.clone()]
    later[0][0, 4], later[1][0, 5] = 99, 99
    with torch.no_grad():  # after the first layer, a sliding one
        outs = [model(input_ids=x, output_hidden_states=True).hidden_states[1][0, 0] for x in (ids, *later)]
    assert not torch.allclose(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_bidirectional_attention"] is True and saved["sliding_window"] == 8 and "is_causal" not in saved
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert reloaded.config.sliding_window == 5 and not is_causal(reloaded)
    torch.testing.assert_close(_hidden(reloaded, ids), _hidden(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma3_text"])
def test_a_saved_model_reloads_bidirectional_with_plain_transformers(tiny_models, tmp_path, arch) -> None:
    """No remote code: the config flags alone make AutoModel's reload bidirectional, with or without padding, on
    sdpa and eager. Llama's attention modules keep transformers' hard-coded is_causal=True there: the is_causal the
    forward passes from the config wins over it (and slmembed reads the config too)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[arch]) if arch in tiny_models else MORE[arch]
    model = _model(source, tokenizer).eval()
    attention.use(model, "bidirectional")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved.get(k) for k in ("is_causal", "use_bidirectional_attention")} == {
        "llama": {"is_causal": False, "use_bidirectional_attention": None},
        "gemma": {"is_causal": False, "use_bidirectional_attention": True},
        "gemma3_text": {"is_causal": None, "use_bidirectional_attention": True}}[arch]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    want_alone, want_batch = _hidden(model, ids[:1]), _hidden(model, ids, attention_mask=mask)
    for impl in ("sdpa", "eager"):
        reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation=impl, dtype=torch.float32).eval()
        flags = {m.is_causal for m in attention.modules(reloaded)}
        assert flags == ({True} if arch == "llama" else {False}) and not is_causal(reloaded)
        torch.testing.assert_close(_hidden(reloaded, ids[:1]), want_alone, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(_hidden(reloaded, ids, attention_mask=mask)[1, :4], want_batch[1, :4],
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(want_batch[1, :4], _hidden(model, ids[1:, :4])[0], atol=2e-5, rtol=1e-4)
    # slmembed's spec causal leaves a model bidirectional by its own config as it is.
    reloaded = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not Embedder(reloaded, tokenizer, EmbedSpec()).causal


def test_through_lora_and_ddp(tiny_models, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    wrapped = get_peft_model(_model(str(tiny_models["llama"]), tokenizer), lora).eval()
    padded = Embedder(wrapped, tokenizer, BIDIRECTIONAL, packed=False)
    assert not padded.causal and wrapped.base_model.model.config.is_causal is False
    want = padded.encode(TEXTS)
    merged = Embedder(wrapped.merge_and_unload(), tokenizer, BIDIRECTIONAL, packed=False)  # the export's model
    np.testing.assert_allclose(merged.encode(TEXTS), want, atol=2e-5)

    torch.manual_seed(0)
    wrapped = get_peft_model(_model(str(tiny_models["llama"]), tokenizer), lora).train()
    packed = Embedder(wrapped, tokenizer, BIDIRECTIONAL, packed=True)
    loss = packed.forward_ids(packed.tokenize(TEXTS)).sum()
    loss.backward()
    assert all(p.grad.abs().max() > 0 for n, p in wrapped.named_parameters() if p.requires_grad)
    with torch.no_grad():
        np.testing.assert_allclose(packed.encode(TEXTS), want, atol=2e-5)  # LoRA dropout is 0: train = eval
    attention.use(wrapped, "causal")
    assert is_causal(wrapped) and not hasattr(wrapped.base_model.model.config, "is_causal")

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(get_peft_model(_model(str(tiny_models["llama"]), tokenizer), lora))
        attention.use(ddp, "bidirectional")
        assert not is_causal(ddp) and not is_causal(ddp.module.base_model.model)
        attention.use(ddp, "causal")
        assert is_causal(ddp)
    finally:
        dist.destroy_process_group()


def test_spec_attention_field() -> None:
    assert EmbedSpec().attention == "causal"
    assert EmbedSpec(**{"pooling": "mean", "prompt": None, "max_length": 8, "append_eos": True}).attention == "causal"
    assert EmbedSpec.of(ModelConfig(attention="bidirectional")).attention == "bidirectional"
    with pytest.raises(SlmembedError, match="attention: expected"):
        EmbedSpec(attention="sideways")
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.use(torch.nn.Linear(2, 2), "sideways")
    with pytest.raises(ValueError, match="no transformers model"):
        attention.use(torch.nn.Linear(2, 2), "bidirectional")
    attention.use(torch.nn.Linear(2, 2), "causal")  # nothing to undo
