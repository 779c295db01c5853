"""GradCache: chunked recomputation gives the plain loss and LoRA gradients, dropout included."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train import _tiny_recipe
from transformers import AutoModel, AutoTokenizer

from slmembed import train as train_mod
from slmembed.embedder import Embedder
from slmembed.gradcache import cached_backward
from slmembed.losses.infonce import info_nce
from slmembed.spec import EmbedSpec

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(24)]  # 8 triplets of varied lengths


def _lora_embedder(folder, padding_side: str) -> Embedder:
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))  # random B, so LoRA gradients are not trivial
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = padding_side
    return Embedder(model.train(), tokenizer, EmbedSpec(max_length=32))


def _loss(emb: torch.Tensor) -> torch.Tensor:
    a, p, n = emb.view(3, -1, emb.shape[-1])
    return info_nce(a, p, n, 0.05)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,side", [("gemma", "left"), ("llama", "right"), ("phi", "right")])
def test_cached_loss_and_lora_gradients_equal_the_plain_ones(tiny_models, arch, side) -> None:
    embedder = _lora_embedder(tiny_models[arch], side)
    ids = embedder.tokenize(TEXTS)
    assert len(embedder.chunks(ids, 40)) >= 4  # several chunks, so the recomputation is really chunked

    torch.manual_seed(1)
    plain = _loss(embedder.forward_ids(ids, 40))
    plain.backward()
    expected = _grads(embedder.model)
    embedder.model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    cached = cached_backward(embedder, ids, 40, _loss)
    got = _grads(embedder.model)

    torch.testing.assert_close(cached, plain.detach(), rtol=1e-4, atol=0)
    assert len(got) == len(expected) > 0
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


def test_dropout_masks_are_replayed(tiny_models) -> None:
    """Without restoring each chunk's random state the recomputed gradients would differ: guard the guard."""
    embedder = _lora_embedder(tiny_models["llama"], "right")
    ids = embedder.tokenize(TEXTS)
    torch.manual_seed(1)
    _loss(embedder.forward_ids(ids, 40)).backward()
    expected = _grads(embedder.model)
    embedder.model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # another seed: other masks, so the gradients must change
    cached_backward(embedder, ids, 40, _loss)
    got = _grads(embedder.model)
    assert any(not torch.allclose(got[k], expected[k], rtol=1e-3) for k in expected)


def test_training_with_grad_cache_matches_plain_training(tmp_path, tiny_models, data_dir) -> None:
    plain = _tiny_recipe(tiny_models, max_steps=3, chunk_tokens=64)
    cached = _tiny_recipe(tiny_models, max_steps=3, chunk_tokens=64, grad_cache=True)
    train_mod.train(plain, tmp_path / "plain", data_dir=data_dir, progress=False)
    train_mod.train(cached, tmp_path / "cached", data_dir=data_dir, progress=False)
    a = load_file(tmp_path / "plain/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "cached/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("grad_cache,packing", [(False, False), (True, False), (True, True)])
def test_compiled_training_matches_eager_training(tmp_path, tiny_models, data_dir, grad_cache, packing) -> None:
    """Regional torch.compile (compile.py) changes how the blocks run, not what they compute: dropout included."""
    from torch._dynamo.utils import counters

    eager = _tiny_recipe(tiny_models, max_steps=3, chunk_tokens=64, grad_cache=grad_cache, packing=packing)
    compiled = _tiny_recipe(tiny_models, max_steps=3, chunk_tokens=64, grad_cache=grad_cache, packing=packing,
                            compile=True)
    train_mod.train(eager, tmp_path / "eager", data_dir=data_dir, progress=False)
    counters.clear()
    train_mod.train(compiled, tmp_path / "compiled", data_dir=data_dir, progress=False)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
    a = load_file(tmp_path / "eager/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "compiled/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
