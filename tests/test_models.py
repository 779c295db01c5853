"""Model resolution: packaged names, folders, hub ids, LoRA on the paper's architectures, remote-code refusal."""

from __future__ import annotations

import json

import pytest
import torch

from slmembed import models
from slmembed.config import Recipe
from slmembed.errors import SlmembedError
from slmembed.train import add_lora


def test_packaged_gguf_converts_to_safetensors_folder(smollm2_dir) -> None:
    assert (smollm2_dir / "model.safetensors").exists() and (smollm2_dir / "tokenizer.json").exists()
    assert json.loads((smollm2_dir / "config.json").read_text())["model_type"] == "llama"
    assert models.resolve("smollm2-135m") == str(smollm2_dir)  # reused, not converted again


def test_packaged_sentence_transformers_folder() -> None:
    folder = models.resolve("all-minilm-l6-v2")
    assert (models.Path(folder) / "modules.json").exists()


def test_unknown_names_and_hub_ids() -> None:
    with pytest.raises(SlmembedError, match="unknown model 'no-such-model'"):
        models.resolve("no-such-model")
    assert models.resolve("google/gemma-2b-it") == "google/gemma-2b-it"


@pytest.mark.parametrize("arch", ["gemma", "phi", "llama"])
def test_lora_on_q_and_v_of_each_architecture(tiny_models, arch: str) -> None:
    model, _ = models.load(str(tiny_models[arch]))
    targets = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    expected = sum(8 * (m.in_features + m.out_features) for m in targets)
    lora = add_lora(model, Recipe())
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected and len(targets) == 4


def test_lora_on_chosen_layers_only(tiny_models) -> None:
    model, _ = models.load(str(tiny_models["llama"]))
    recipe = Recipe()
    recipe.lora.layers = [-1]
    names = [n for n, p in add_lora(model, recipe).named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)


def test_remote_code_is_refused_unless_asked(tmp_path, tiny_models) -> None:
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    config["model_type"] = "minicpm"  # as MiniCPM-2B's config: a type transformers only knows through remote code
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel", "AutoConfig": "modeling_custom.CustomConfig"}
    for f in tiny_models["llama"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(SlmembedError, match="--trust-remote-code"):
        models.load(str(tmp_path))
    with pytest.raises(RuntimeError, match="remote code ran"):
        models.load(str(tmp_path), trust_remote_code=True)


def test_best_dtype_is_bf16_or_fp32() -> None:
    assert models.best_dtype(torch.device("cpu")) in (torch.bfloat16, torch.float32)
