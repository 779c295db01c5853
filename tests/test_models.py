"""Model resolution: packaged names, folders, hub ids, LoRA on the paper's architectures, remote-code refusal."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from slmembed import models
from slmembed.config import Recipe
from slmembed.errors import SlmembedError
from slmembed.tuning import prepare


def test_packaged_gguf_converts_to_safetensors_folder(smollm2_dir) -> None:
    assert (smollm2_dir / "model.safetensors").exists() and (smollm2_dir / "tokenizer.json").exists()
    assert json.loads((smollm2_dir / "config.json").read_text())["model_type"] == "llama"
    assert models.resolve("smollm2-135m") == str(smollm2_dir)  # reused, not converted again
    # The special tokens are the GGUF file's (tokenizer.ggml.eos_token_id 2 ...), whichever transformers converted it.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    special = (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    assert special == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2)
    # ... and so does its add-BOS flag (false for SmolLM2; Gemma's says true, which transformers 5.18-5.23 dropped)
    assert tokenizer("Hi there")["input_ids"] == tokenizer("Hi there", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_converted_into_characters_is_refused(smollm2_dir) -> None:
    """transformers 5.17 converts Gemma's GGUF tokenizer into a scoreless Unigram model that splits text into
    characters; such a conversion is refused before it is cached, a real one passes."""
    models._check_subwords(AutoTokenizer.from_pretrained(smollm2_dir))  # 10 tokens for the probe's 9 words

    class Characters:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(SlmembedError, match=r"converts this model's GGUF tokenizer wrongly \(44 tokens for the 9 "
                                            r"words .*pip install 'transformers>=5.18'"):
        models._check_subwords(Characters())


def test_a_converted_folder_reads_its_tokenizer_fast_once_checked(tmp_path, smollm2_dir, monkeypatch) -> None:
    import shutil

    import transformers

    folder = tmp_path / "converted"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "slmembed_source.json"):
        shutil.copy(smollm2_dir / name, folder / name)
    calls = []
    auto = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or auto(*a, **k))
    first = models._load_tokenizer(str(folder), trust_remote_code=False)  # AutoTokenizer's, then checked
    check = folder / models.TOKENIZER_CHECK
    assert len(calls) == 1 and json.loads(check.read_text()) == {"transformers": transformers.__version__}
    second = models._load_tokenizer(str(folder), trust_remote_code=False)
    assert len(calls) == 1 and type(second) is type(first)  # read fast: AutoTokenizer not asked again
    assert models._same_when_saved(first, second)
    texts = ["A man is playing a guitar.", "<|im_end|> tokens, 日本語 and   spaces"]
    assert second(texts)["input_ids"] == first(texts)["input_ids"]
    assert (second.eos_token_id, second.pad_token_id, second.padding_side) == (
        first.eos_token_id, first.pad_token_id, first.padding_side)

    check.write_text(json.dumps({"transformers": "0.0.0"}))  # another release: checked again before it is trusted
    models._load_tokenizer(str(folder), trust_remote_code=False)
    assert len(calls) == 2 and json.loads(check.read_text())["transformers"] == transformers.__version__
    (folder / "slmembed_source.json").unlink()  # not a folder slmembed converted: always AutoTokenizer, nothing written
    check.unlink()
    models._load_tokenizer(str(folder), trust_remote_code=False)
    assert len(calls) == 3 and not check.exists()
    second.add_tokens(["<new>"])
    assert not models._same_when_saved(first, second)


def test_concurrent_resolves_build_a_packaged_model_once(tmp_path, tiny_models, monkeypatch) -> None:
    """Several resolvers of one packaged model on a fresh cache (torchrun's ranks, test workers): one builds the
    folder, the others wait for it and reuse it."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in tiny_models["llama"].iterdir():
            zf.write(f, f"tiny/{f.name}")
    data = archive.read_bytes()
    (tmp_path / "m.zip.001").write_bytes(data[:len(data) // 2])
    (tmp_path / "m.zip.002").write_bytes(data[len(data) // 2:])
    monkeypatch.setitem(models.PACKAGED, "tiny-zip",
                        models.Packaged(("none",), ("m.zip.001", "m.zip.002"), "zip", "org/tiny"))
    monkeypatch.setattr(models, "_find_part", lambda dists, name: tmp_path / name)
    monkeypatch.setenv("SLMEMBED_CACHE", str(tmp_path / "cache"))
    joined, join = [], models._join

    def slow_join(parts: list[Path], target: Path) -> None:  # a build long enough for the others to arrive
        joined.append(target)
        time.sleep(0.5)
        join(parts, target)

    monkeypatch.setattr(models, "_join", slow_join)
    folders: list[str] = []
    threads = [threading.Thread(target=lambda: folders.append(models.resolve("tiny-zip"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(joined) == 1 and len(folders) == 3 and len(set(folders)) == 1
    assert folders[0] == str(tmp_path / "cache" / "models" / "tiny-zip")
    assert json.loads((Path(folders[0]) / "config.json").read_text())["model_type"] == "llama"


def test_lora_layers_out_of_range_are_refused(tiny_models) -> None:
    model, _ = models.load(str(tiny_models["llama"]))
    recipe = Recipe()
    recipe.lora.layers = [2]  # the tiny model has layers 0 and 1
    with pytest.raises(SlmembedError, match=r"lora.layers: expected layer numbers from -2 to 1 .* got \[2\]"):
        prepare(model, recipe)


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
    lora = prepare(model, Recipe())
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected and len(targets) == 4


@pytest.mark.parametrize("arch", ["gemma", "phi", "llama"])
def test_the_meta_device_builds_the_model_without_reading_weights(tiny_models, arch: str) -> None:
    """What sharded training's other processes load (sharding.shard fills it from the first's): the same model,
    tensor for tensor in names, shapes and dtypes, with no storage."""
    real, _ = models.load(str(tiny_models[arch]), dtype=torch.bfloat16)
    empty, tokenizer = models.load(str(tiny_models[arch]), dtype=torch.bfloat16, device=torch.device("meta"))
    assert type(empty) is type(real) and empty.config.to_dict() == real.config.to_dict() and not empty.training
    want = {n: (t.shape, t.dtype) for n, t in real.state_dict().items()}
    assert {n: (t.shape, t.dtype) for n, t in empty.state_dict().items()} == want
    assert all(t.is_meta for t in empty.state_dict().values()) and tokenizer.pad_token is not None


def test_lora_on_chosen_layers_only(tiny_models) -> None:
    model, _ = models.load(str(tiny_models["llama"]))
    recipe = Recipe()
    recipe.lora.layers = [-1]
    names = [n for n, p in prepare(model, recipe).named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)


def test_remote_code_is_refused_unless_asked(remote_code_model) -> None:
    with pytest.raises(SlmembedError, match="--trust-remote-code"):
        models.load(str(remote_code_model))
    with pytest.raises(RuntimeError, match="remote code ran"):
        models.load(str(remote_code_model), trust_remote_code=True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pickle_weights_are_refused_unless_allowed(pickle_model, tiny_models) -> None:
    with pytest.raises(SlmembedError) as info:
        models.load(str(pickle_model))
    assert str(info.value).startswith(f"{pickle_model / 'pytorch_model.bin'} is a pickle checkpoint")
    assert "--allow-pickle" in str(info.value)
    model, _ = models.load(str(pickle_model), allow_pickle=True)
    assert _same_weights(model, models.load(str(tiny_models["llama"]))[0])


def test_safetensors_win_over_pickle_weights(pickle_model, tiny_models) -> None:
    reference = models.load(str(tiny_models["llama"]))[0]
    state = torch.load(pickle_model / "pytorch_model.bin", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, pickle_model / "pytorch_model.bin")
    (pickle_model / "model.safetensors").write_bytes((tiny_models["llama"] / "model.safetensors").read_bytes())
    for allow in (False, True):
        assert _same_weights(models.load(str(pickle_model), allow_pickle=allow)[0], reference)
