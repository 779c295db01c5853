"""``train.packed_attention: flex``: FlexAttention with a document mask gives the reference's packed attention, the
padded forward's vectors and the reference kernel's training losses, and is refused in one line where it cannot run.

torch refuses FlexAttention's backward on the CPU at its entry (``_validate_device``), although its unfused dense
backward runs there; tests that need gradients lift that check (``cpu_backward``), so that the mask, the padding,
grouped-query attention and the scale are checked here, on the CPU. The fused kernel itself is torch's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from test_cuda_graphs import _batch, _embedder, _grads
from test_gradcache import TEXTS
from test_packing import MORE, _model
from test_train import _tiny_recipe
from transformers import AutoTokenizer, Gemma3TextConfig

from slmembed import cuda_graphs, packing
from slmembed import train as train_mod
from slmembed.batch import batch_loss
from slmembed.cli import main
from slmembed.config import TrainConfig, field_error
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.losses.infonce import info_nce
from slmembed.spec import EmbedSpec

LENGTHS = [1, 2, 17, 128, 129, 5]  # 282 tokens: 3 tiles, the last one padded with a filler sequence


@pytest.fixture
def cpu_backward(monkeypatch):
    """torch's entry check without its refusal of the CPU's backward."""
    check = flex_module._validate_device

    def lifted(query, key, value):
        with torch.no_grad():
            check(*(x.detach() for x in (query, key, value)))

    monkeypatch.setattr(flex_module, "_validate_device", lifted)


@pytest.mark.parametrize("tile", [128, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_equals_the_reference_with_its_gradients(cpu_backward, causal: bool, tile: int) -> None:
    """Four query heads over two key/value heads, scale 0.3, sequences of 1 to 129 tokens, tiles of 128 or 64 tokens:
    the outputs of the real rows and the gradients of q, k and v equal the explicit mask's (``_reference``, each
    key/value head repeated for its group), within 1e-5; the filler's rows stay finite."""
    tokens = sum(LENGTHS)
    padded = -(-tokens // tile) * tile
    cu = torch.tensor(np.cumsum([0, *LENGTHS, padded - tokens]), dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, padded, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(1, 2, padded, 8, generator=generator, requires_grad=True) for _ in range(2))
    weights = torch.randn(tokens, 4, 8, generator=generator)  # a loss that weighs every output differently

    documents = packing.document_mask(cu, padded, causal, tile)
    out, _ = packing.attention(torch.nn.Module(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu,
                               is_causal=causal, documents=documents)
    assert out.shape == (1, padded, 4, 8) and torch.isfinite(out).all()
    got = torch.autograd.grad((out[0, :tokens] * weights).sum(), (query, key, value))

    q, k, v = (x[0, :, :tokens].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    want_out = packing._reference(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), cu[:-1], 0.3,
                                  causal)
    want = torch.autograd.grad((want_out * weights).sum(), (query, key, value))
    torch.testing.assert_close(out[0, :tokens], want_out, rtol=0, atol=1e-5)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(RuntimeError, match="block mask is for causal"):
        packing.attention(torch.nn.Module(), query, key, value, None, cu_seq_lens_q=cu, is_causal=not causal,
                          documents=documents)


def test_the_block_mask_skips_the_tiles_of_other_sequences() -> None:
    """Tiles no query of which sees a key of its sequence are left out: 4 sequences of 128 tokens, causal, give the
    four diagonal tiles alone, each partly masked; bidirectional, the same four, whole."""
    cu = torch.tensor([0, 128, 256, 384, 512], dtype=torch.int32)
    for causal in (True, False):
        block = packing.document_mask(cu, 512, causal).block_mask
        dense = block.to_dense()[0, 0]
        torch.testing.assert_close(dense, torch.eye(4, dtype=dense.dtype))
        assert int(block.full_kv_num_blocks.sum()) == (0 if causal else 4)


@pytest.mark.parametrize("tile", sorted(set(packing.FLEX_TILES.values())))
@pytest.mark.parametrize("causal", [True, False])
def test_the_block_mask_built_from_cu_is_create_block_masks(causal: bool, tile: int) -> None:
    """Sequences of 1 to 400 tokens (many to a tile, one over several tiles, boundaries on and off the tiles' edges),
    in each kernel's tiles: the tiles built from ``cu`` are those ``create_block_mask`` finds from every (query, key)
    pair, partial and full alike, in the same order, and the masks' dense forms are equal."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(0)
    for lengths in ([3] * 50 + [128, 256, 1], [400, 7, 121, 128, 9], list(rng.integers(1, 60, 70)), [1000]):
        tokens = int(sum(lengths))
        padded = -(-tokens // tile) * tile
        cu = torch.tensor(np.cumsum([0, *lengths] + ([padded - tokens] if padded > tokens else [])),
                          dtype=torch.int32)
        got = packing.document_mask(cu, padded, causal, tile).block_mask
        document = torch.searchsorted(cu[1:].long(), torch.arange(padded), right=True)

        def mod(b, h, q, k, document=document):
            return (document[q] == document[k]) & (q >= k) if causal else document[q] == document[k]

        want = create_block_mask(mod, None, None, padded, padded, device="cpu", BLOCK_SIZE=tile)
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
        for count, name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            n = getattr(want, count)[0, 0]
            for row, k in enumerate(n.tolist()):
                assert getattr(got, name)[0, 0, row, :k].tolist() == getattr(want, name)[0, 0, row, :k].tolist()
        torch.testing.assert_close(got.to_dense(), want.to_dense())
        q, k = torch.randint(0, padded, (2, 2000))
        assert torch.equal(got.mask_mod(0, 0, q, k), mod(0, 0, q, k))


@pytest.mark.parametrize("kernel,attention", [("flex", "causal"), ("flex", "bidirectional"), ("flex64", "causal")])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_flex_vectors_equal_padded_ones(tiny_models, arch: str, attention: str, kernel: str) -> None:
    """A tiny Llama (four query heads over two) and a tiny Gemma-3 (four over one, its own scale), causal or
    bidirectional: packed with FlexAttention (128-token tiles, or 64), the vectors of the padded forward."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[arch]) if arch in tiny_models else MORE[arch]
    if arch == "gemma3_text" and attention == "bidirectional":  # its window |i - j| < 17 then holds 16 tokens
        source = Gemma3TextConfig(**{**source.to_dict(), "sliding_window": 32})
    spec = EmbedSpec(max_length=16, attention=attention)
    padded = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=False)
    flex = Embedder(_model(source, tokenizer).eval(), tokenizer, spec, packed=True, kernel=kernel)
    calls = []
    flex_attention = packing._flex

    def counted(*args):
        calls.append(args[3].BLOCK_SIZE)
        return flex_attention(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "_flex", counted)
        got = flex.encode(TEXTS, batch_size=24, max_tokens=60)
    layers = flex.model.config.num_hidden_layers
    assert len(calls) == layers * len(flex.chunks(flex.tokenize(TEXTS), 60))  # every layer of every chunk: flex
    assert set(calls) == {(packing.FLEX_TILES[kernel],) * 2}
    np.testing.assert_allclose(got, padded.encode(TEXTS, batch_size=5), atol=2e-5, err_msg=f"{arch} {attention}")


def test_training_with_flex_gives_the_reference_kernels_losses(tmp_path, tiny_models, data_dir, cpu_backward,
                                                                monkeypatch) -> None:
    """Four packed steps of a tiny Llama, LoRA without dropout: the losses with the explicit mask (``auto`` on the
    CPU) and with FlexAttention (every attention call of the run) agree within float32 rounding; later steps' losses
    depend on the earlier updates, so the gradients agree too."""
    losses, calls = {}, []
    flex_attention = packing._flex
    monkeypatch.setattr(packing, "_flex", lambda *args: calls.append(1) or flex_attention(*args))
    for kernel in ("auto", "flex"):
        recipe = _tiny_recipe(tiny_models, max_steps=4, packing=True, packed_attention=kernel, save_every=100)
        recipe.lora.dropout = 0.0
        train_mod.train(recipe, tmp_path / kernel, data_dir=data_dir, progress=False)
        losses[kernel] = [json.loads(line)["loss"] for line in (tmp_path / f"{kernel}/train_log.jsonl").open()]
        assert bool(calls) is (kernel == "flex")
    assert len(losses["flex"]) == 4 and losses["flex"][0] != losses["flex"][-1]
    np.testing.assert_allclose(losses["flex"], losses["auto"], rtol=1e-5)


def test_flex_training_on_the_cpu_is_one_line(capsys, tmp_path) -> None:
    """torch has no FlexAttention backward on the CPU: refused before the model loads, with what to do."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(out), "--set", "train.packed_attention=flex",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slmembed: error: train.packed_attention: flex: torch {torch.__version__} has no FlexAttention "
                   "backward on the cpu: set train.packed_attention=auto, or train on a GPU"), err
    assert not out.exists()


def test_kernels_that_cannot_run_are_refused(capsys, tmp_path, tiny_models, monkeypatch) -> None:
    """varlen on the CPU and a packed kernel without packing are one line; flex for a model that cannot run packed
    batches, or where torch has none, is refused by the Embedder (and the latter by the check, before loading)."""
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(tmp_path / "a"), "--set",
                 "train.packed_attention=varlen", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "slmembed: error: train.packed_attention: varlen is variable-length FlashAttention, on a GPU; this run is on "
        "the cpu: set train.packed_attention=auto")
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(tmp_path / "b"), "--set",
                 "train.packed_attention=flex", "--set", "train.packing=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("train.packed_attention: flex is the attention of packed batches, and train.packing is "
                        "false: set train.packing to true (or null), or train.packed_attention to auto"), err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    windowed = _model(MORE["gemma3_text"], tokenizer)  # a 16-token sliding window
    with pytest.raises(SlmembedError, match=r"^train.packed_attention: flex is the attention of packed batches, which "
                                            r"this model cannot run: its sliding window \(16 tokens\) is shorter than "
                                            r"max_length \(32\); set train.packed_attention=auto$"):
        Embedder(windowed, tokenizer, EmbedSpec(max_length=32), kernel="flex")
    assert Embedder(windowed, tokenizer, EmbedSpec(max_length=16), kernel="flex").packed  # asked: packed on the CPU

    monkeypatch.setattr(packing, "flex_attention", None)
    with pytest.raises(SlmembedError, match=r"^train.packed_attention: flex needs torch.nn.attention.flex_attention"):
        packing.check("flex", torch.device("cuda"))
    with pytest.raises(SlmembedError, match="flex needs torch.nn.attention.flex_attention, which torch"):
        Embedder(_model(str(tiny_models["llama"]), tokenizer), tokenizer, EmbedSpec(), packed=True, kernel="flex")


def test_a_graphed_step_with_flex_gives_the_ordinary_steps_loss_and_gradients(tiny_models, cpu_backward) -> None:
    """CUDA graphs' fixed-shape step (its filler sequence, the bucket's length: a multiple of the tile), run on the
    CPU's static inputs with FlexAttention, gives the loss and LoRA gradients of the ordinary step with the explicit
    mask."""
    reference = _embedder(tiny_models)
    flex = _embedder(tiny_models)
    flex = Embedder(flex.model, flex.tokenizer, flex.spec, packed=True, kernel="flex")
    batch = _batch(reference, np.arange(2, 12), {3, 7})
    want = batch_loss(info_nce, batch, reference.forward_ids(batch.ids, 4096), 0.05)
    want.backward()
    params = [p for p in flex.model.parameters() if p.requires_grad]
    got = cuda_graphs.GraphedStep(flex, info_nce, 0.05, params, bf16=False, max_tokens=4096)(batch)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    want_grads, got_grads = _grads(reference), _grads(flex)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel: run on the GPU machine")
@pytest.mark.parametrize("tile", sorted(set(packing.FLEX_TILES.values())))
@pytest.mark.parametrize("heads,kv_heads,size", [(9, 3, 64), (4, 1, 256)])  # SmolLM2-135M's, Gemma-3-270M's
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_flex_on_the_gpu_equals_the_reference(causal: bool, heads: int, kv_heads: int, size: int,
                                                       tile: int) -> None:
    """torch's fused kernel, bf16, on the two models' head layouts, in each kernel's tiles (its blocks set to match
    below 128): outputs and gradients within bf16's rounding of the explicit mask's."""
    tokens = sum(LENGTHS)
    padded = -(-tokens // tile) * tile
    cu = torch.tensor(np.cumsum([0, *LENGTHS, padded - tokens]), dtype=torch.int32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(1, heads, padded, size, generator=generator, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, kv_heads, padded, size, generator=generator, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
    query, key, value = (x.requires_grad_() for x in (query, key, value))
    out, _ = packing.attention(torch.nn.Module(), query, key, value, None, scaling=size**-0.5, cu_seq_lens_q=cu,
                               is_causal=causal, documents=packing.document_mask(cu, padded, causal, tile))
    got = torch.autograd.grad(out[0, :tokens].float().square().sum(), (query, key, value))
    group = heads // kv_heads
    q, k, v = (x[0, :, :tokens].transpose(0, 1) for x in (query, key, value))
    want_out = packing._reference(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), cu[:-1],
                                  size**-0.5, causal)
    want = torch.autograd.grad(want_out.float().square().sum(), (query, key, value))
    torch.testing.assert_close(out[0, :tokens].float(), want_out.float(), rtol=0.02, atol=0.02)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels and CUDA graphs: run on the GPU machine")
@pytest.mark.parametrize("setting", [{}, {"compile": True}, {"cuda_graphs": True}])
def test_flex_training_on_the_gpu_equals_varlen(tmp_path, tiny_models, data_dir, setting: dict) -> None:
    """Eight bf16 steps of a tiny Llama with FlexAttention, eager, in compiled blocks or recorded in CUDA graphs:
    the losses of variable-length FlashAttention's steps within bf16's noise."""
    losses = {}
    for kernel in ("varlen", "flex"):
        recipe = _tiny_recipe(tiny_models, max_steps=8, bf16=True, packing=True, packed_attention=kernel,
                              chunk_tokens=65536, save_every=100, **setting)
        recipe.lora.dropout = 0.0
        train_mod.train(recipe, tmp_path / kernel, data_dir=data_dir, device="cuda", progress=False)
        losses[kernel] = [json.loads(line)["loss"] for line in (tmp_path / f"{kernel}/train_log.jsonl").open()]
    assert len(losses["flex"]) == 8
    np.testing.assert_allclose(losses["flex"], losses["varlen"], rtol=1e-2)


def test_the_recipe_field_takes_every_kernel_and_no_other() -> None:
    """``train.packed_attention`` accepts auto, varlen and each FlexAttention tile packing.py has, and nothing else."""
    for kernel in ("auto", "varlen", *packing.FLEX_TILES):
        assert field_error(TrainConfig, "packed_attention", kernel) is None, kernel
    assert field_error(TrainConfig, "packed_attention", "flex16") is not None
