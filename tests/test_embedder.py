"""Pooling, EOS, prompts and padding: the same text must give the same vector whichever side pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmembed import embedder as embedder_module
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.loading import load_embedder
from slmembed.pooling import padded as pool
from slmembed.spec import PROMPTS, EmbedSpec

TEXTS = ["A man is playing a guitar.", "Hi", "The quick brown fox jumps over the lazy dog near the river bank today."]


def test_pool_picks_last_real_token_for_both_paddings() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.stack([hidden[0, 2], hidden[1, 0]]))
    torch.testing.assert_close(pool(hidden, right, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def _embedder(folder, side: str, masked: bool = False, **spec) -> Embedder:
    """``masked`` switches the causal fast path off: padding on ``side`` and an attention mask, as for encoders."""
    emb = load_embedder(str(folder), device=torch.device("cpu"), dtype=torch.float32, **spec)
    emb.tokenizer.padding_side = side
    emb.causal = emb.causal and not masked
    return emb


@pytest.mark.parametrize("arch", ["gemma", "phi", "llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_left_right_and_unmasked_padding_agree_on_tiny_models(tiny_models, arch: str, pooling: str) -> None:
    right = _embedder(tiny_models[arch], "right", masked=True, pooling=pooling).encode(TEXTS, batch_size=3)
    left = _embedder(tiny_models[arch], "left", masked=True, pooling=pooling).encode(TEXTS, batch_size=3)
    fast = _embedder(tiny_models[arch], "left", pooling=pooling)
    assert fast.causal and fast.collate([[5], [5, 6, 7]])["input_ids"][0, 0] == 5  # right-padded, whatever the side
    unmasked = fast.encode(TEXTS, batch_size=3)
    alone = np.stack([_embedder(tiny_models[arch], "right", masked=True, pooling=pooling).encode([t])[0]
                      for t in TEXTS])
    np.testing.assert_allclose(left, right, atol=1e-5)
    np.testing.assert_allclose(unmasked, right, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(right, axis=1), 1.0, rtol=1e-5)


def test_encoders_keep_the_mask(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    from slmembed.embedder import is_causal

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    assert not is_causal(bert) and not is_causal(torch.nn.Linear(2, 2))


def test_padding_sides_and_the_fast_path_agree_on_smollm2(smollm2_dir) -> None:
    right = _embedder(smollm2_dir, "right", masked=True).encode(TEXTS, batch_size=3)
    left = _embedder(smollm2_dir, "left", masked=True).encode(TEXTS, batch_size=3)
    fast = _embedder(smollm2_dir, "left").encode(TEXTS, batch_size=3)
    assert (left * right).sum(1).min() > 0.9999 and (fast * right).sum(1).min() > 0.9999


def test_eos_appended_and_kept_under_truncation(tiny_models) -> None:
    emb = _embedder(tiny_models["llama"], "right", max_length=8)
    ids = emb.tokenize(["one two three four five six seven eight nine ten", "hi"])
    eos = emb.tokenizer.eos_token_id
    assert len(ids[0]) == 8 and ids[0][-1] == eos and ids[1][-1] == eos
    assert ids[1][:-1] == emb.tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("prompt", ["P1", "P2", "{} is: ", 'Q: "{}"!'])
@pytest.mark.parametrize("max_length", [6, 12, 40])
def test_a_cut_text_keeps_the_templates_tail(tiny_models, prompt: str, max_length: int) -> None:
    emb = _embedder(tiny_models["llama"], "right", prompt=prompt, max_length=max_length)
    template, tok, eos = emb.spec.template, emb.tokenizer, emb.tokenizer.eos_token_id
    prefix = template.partition("{}")[0]
    # the tail, independently: the tokens after "0" (a digit never merges with the quote or space that follows)
    tail = tok(template.format("0"))["input_ids"][len(tok(prefix + "0")["input_ids"]):]
    texts = ["a cat", "one two three four five six seven eight nine ten " * 4, "(quoted) text."]
    for text, got in zip(texts, emb.tokenize(texts), strict=True):
        whole = tok(template.format(text))["input_ids"]
        if len(whole) < max_length:
            assert got == whole + [eos]
        else:  # cut to fit the EOS, then its last tokens overwritten with the tail
            keep = min(len(tail), max_length - 1)
            assert got == whole[:max_length - 1 - keep] + tail[len(tail) - keep:] + [eos]
    assert tail and emb.tail == tail


@pytest.mark.parametrize(("name", "template"), [
    ("P1", 'This sentence: "{}" means in one word: "'),
    ("PromptEOL", 'This sentence : "{}" means in one word:"'),  # Jiang et al. 2023
    ("AnglE", 'Summarize sentence "{}" in one word:"'),  # AnglE's Prompts.A
])
def test_prompt_templates(tiny_models, name: str, template: str) -> None:
    emb = _embedder(tiny_models["llama"], "right", prompt=name)
    expected = emb.tokenizer(template.format("a cat"))["input_ids"] + [emb.tokenizer.eos_token_id]
    assert emb.tokenize(["a cat"])[0] == expected and PROMPTS[name] == template
    with pytest.raises(SlmembedError, match="prompt: expected P1, P2, P3, PromptEOL, AnglE or a template with exactly"):
        EmbedSpec(prompt="no placeholder")


def test_encode_keeps_input_order(tiny_models) -> None:
    emb = _embedder(tiny_models["llama"], "left", masked=True)
    texts = TEXTS * 3
    batched = emb.encode(texts, batch_size=2)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(batched[i], emb.encode([t])[0], atol=1e-5)


def test_encode_tokenises_in_pieces_while_embedding(tiny_models, monkeypatch, capsys) -> None:
    emb = _embedder(tiny_models["llama"], "left", masked=True)
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 4)]
    whole = emb.encode(texts, batch_size=4)
    tokenised = []
    tokenize = emb.tokenize
    monkeypatch.setattr(emb, "tokenize", lambda piece: tokenised.append(list(piece)) or tokenize(piece))
    monkeypatch.setattr(embedder_module, "PIECE", 5)
    pieces = emb.encode(texts, batch_size=4, progress=True)
    assert tokenised == [texts[:5], texts[5:10], texts[10:]]  # in order, each once
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
    assert "12/12" in capsys.readouterr().err  # one bar over every piece, counting texts
    assert emb.encode([], batch_size=4).shape == (0, 0)


def test_collate_pads_to_a_multiple_of_8_with_position_ids_on_the_left(tiny_models) -> None:
    emb = _embedder(tiny_models["llama"], "left", masked=True)
    assert emb.collate([[5, 6, 7], [5] * 10])["input_ids"].shape == (2, 10)  # on the CPU: to the longest
    batch = emb.collate([[5, 6, 7], [5] * 10], multiple=8)  # a GPU's default
    assert batch["input_ids"].shape == (2, 16)
    assert batch["position_ids"][0, -3:].tolist() == [0, 1, 2] and batch["attention_mask"][0].sum() == 3


def test_pickle_adapters_are_refused_unless_allowed(tmp_path, tiny_models) -> None:
    from peft import LoraConfig, get_peft_model

    from slmembed import models
    from slmembed.errors import SlmembedError

    base = str(tiny_models["llama"])
    lora = get_peft_model(models.load(base)[0], LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path, safe_serialization=False)  # adapter_model.bin, a pickle
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(SlmembedError, match="adapter_model.bin is a pickle checkpoint.*--allow-pickle"):
        load_embedder(base, tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    tuned = load_embedder(base, tmp_path, device=torch.device("cpu"), dtype=torch.float32, allow_pickle=True)
    plain = load_embedder(base, device=torch.device("cpu"), dtype=torch.float32)
    assert not np.allclose(tuned.encode(TEXTS), plain.encode(TEXTS), atol=1e-4)  # the adapter was applied


@pytest.mark.parametrize("model", ["smollm2-135m", "all-minilm-l6-v2"])
@pytest.mark.parametrize("room", [6, 512])
def test_backend_tokenizing_equals_the_tokenizer_call(model, room, data_dir) -> None:
    """The Rust backend's batch call (the fast path of ``Embedder.tokenize``) gives the tokenizer's own ids: special
    tokens written in the text, truncation, empty and non-ASCII texts, a decoder's and an encoder's tokenizer; and
    the tokenizer's own call still pads and returns tensors after it."""
    from transformers import AutoTokenizer

    from slmembed import models
    from slmembed.data.sts import load_all
    from slmembed.embedder import _fast_tokenize

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(model))
    sts = load_all(["STSBenchmark"], data_dir=data_dir)["STSBenchmark"]
    texts = [*TEXTS, "", "  spaced  out  ", "naïve café – 東京 🚀", f"a {tokenizer.eos_token or '[SEP]'} inside",
             "[CLS] <|im_start|> <s> tokens", "word " * 600, *sts.sentences1[:200]]
    want = tokenizer(texts, truncation=True, max_length=room, add_special_tokens=True)["input_ids"]
    assert _fast_tokenize(tokenizer, texts, room) == want
    assert max(map(len, want)) == room  # truncation took effect
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # the backend's settings do not leak into calls
    assert batch["input_ids"].shape[0] == 3 and len(set(map(len, tokenizer(TEXTS)["input_ids"]))) == 3
