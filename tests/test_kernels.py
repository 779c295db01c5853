"""``train.kernels: liger``: liger-kernel's fused RMSNorm, gated MLP and rotary embeddings give the loss and LoRA
gradients of transformers' own modules (on a GPU, where Triton runs), and are refused in one line where they cannot
run."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_gradcache import TEXTS, _loss
from test_packing import MORE, _model
from transformers import AutoTokenizer

from slmembed import kernels
from slmembed.cli import main
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.spec import EmbedSpec

ON_GPU = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def test_liger_on_the_cpu_is_one_line_before_any_work(capsys, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(out), "--set", "train.kernels=liger",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("slmembed: error: train.kernels: liger runs Triton kernels on a GPU; this run is on the cpu: "
                   "set train.kernels=none"), err
    assert not out.exists()


def test_liger_compiled_is_one_line(capsys, tmp_path) -> None:
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(tmp_path / "run"), "--set", "train.kernels=liger",
                 "--set", "train.compile=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.kernels: liger cannot run compiled yet" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_kernels_name_the_field(capsys, tmp_path) -> None:
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(tmp_path / "run"),
                 "--set", "train.kernels=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.kernels" in err and "one of none, liger" in err and "\n" not in err, err


def test_architecture_without_liger_kernels_is_refused(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    with pytest.raises(SlmembedError, match="no kernels for model type 'phi'"):
        kernels.apply(_model(str(tiny_models["phi"]), tokenizer), "liger")


@pytest.mark.skipif(not ON_GPU, reason="Triton kernels: run on the GPU machine with liger-kernel installed "
                                       "(bench/plans/multi-gpu.sh kernels)")
@pytest.mark.parametrize("arch", ["gemma", "llama", "gemma3_text", "qwen2", "mistral"])
def test_liger_kernels_keep_the_loss_and_lora_gradients(arch, tiny_models, monkeypatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[arch]) if arch in tiny_models else MORE[arch]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    results = []
    for use in ("none", "liger"):
        base = _model(source, tokenizer)
        if use == "liger":  # liger also patches the architecture's module: restored after the test
            module = importlib.import_module(type(base).__module__)
            for name, value in list(vars(module).items()):
                if callable(value):
                    monkeypatch.setattr(module, name, value)
            kernels.apply(base, "liger")
        torch.manual_seed(1)
        model = get_peft_model(base.cuda(), lora).train()
        embedder = Embedder(model, tokenizer, EmbedSpec(max_length=16), packed=False)
        loss = _loss(embedder.forward_ids(embedder.tokenize(TEXTS), 64))
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (loss_ref, grads_ref), (loss_liger, grads_liger) = results
    torch.testing.assert_close(loss_liger, loss_ref, rtol=1e-4, atol=0)
    assert grads_liger.keys() == grads_ref.keys() and any("gate_proj" in k for k in grads_ref)
    for name, grad in grads_ref.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_liger[name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item(), msg=name)
