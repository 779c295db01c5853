"""What training updates (tuning.py) and how a run picks its final weights (selection.py): full fine-tuning end to
end, LoRA and full averages against the mean of the weights they stand for, selection on STSBenchmark dev, and the
loss of batches whose examples lack a negative."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from slmembed import train as train_mod
from slmembed import tuning
from slmembed.config import Recipe, recipe_from_dict
from slmembed.data.sts import load_sts
from slmembed.errors import SlmembedError
from slmembed.evaluate import evaluate
from slmembed.export import export
from slmembed.loading import load_embedder
from slmembed.losses import objective
from slmembed.models import load
from slmembed.run import RunDir

CPU = torch.device("cpu")


def _recipe(tiny_models, **train) -> Recipe:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    for key, value in {"batch_size": 8, "max_steps": 6, "warmup_steps": 1, "lr": 1e-3, "save_every": 2,
                       "bf16": False, "log_every": 1, **train}.items():
        setattr(recipe.train, key, value)
    recipe.lora.dropout = 0.0
    return recipe


def test_full_finetuning_trains_every_weight_resumes_exactly_and_exports(tmp_path, tiny_models, data_dir) -> None:
    recipe = _recipe(tiny_models, finetune="full", lr=1e-4)
    train_mod.train(recipe, tmp_path / "a", data_dir=data_dir, progress=False)
    assert (tmp_path / "a/model/model.safetensors").exists() and not (tmp_path / "a/adapter").exists()
    base = {k.removeprefix("model."): v for k, v in load_file(tiny_models["llama"] / "model.safetensors").items()}
    tuned = load_file(tmp_path / "a/model/model.safetensors")
    changed = [k for k in tuned if not torch.equal(tuned[k], base[k])]
    assert {k.rsplit(".", 2)[-2] for k in changed} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj", "embed_tokens"}
    # Interrupted after its step-4 checkpoint and resumed: the same weights as the run without a break.
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, progress=False)
    for name in ("model", "summary.json", "embed.json"):
        target = tmp_path / "b" / name
        train_mod.shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert (RunDir(tmp_path / "b").checkpoints()[-1] / "model.safetensors").exists()
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)
    again = load_file(tmp_path / "b/model/model.safetensors")
    for key in tuned:
        torch.testing.assert_close(again[key], tuned[key], rtol=0, atol=1e-6)
    # slmembed loads the run from its own folder; the export loads alike in sentence-transformers.
    texts = ["A man plays a guitar.", "Two dogs run on the beach in the sun.", "x"]
    reference = load_embedder(None, adapter=tmp_path / "a", device=CPU, dtype=torch.float32)
    expected = reference.encode(texts)
    export(tmp_path / "a", tmp_path / "st")
    got = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True).encode(texts)
    assert float((got * expected).sum(1).min()) >= 0.9999
    assert "every weight" in (tmp_path / "st/README.md").read_text()
    with pytest.raises(SlmembedError, match="trained every weight: it has no adapter"):
        export(tmp_path / "a", tmp_path / "adapter-export", merge=False)


def _states(model, recipe: Recipe, k: int) -> list[dict[str, torch.Tensor]]:
    """k random states of the model's trainable tensors."""
    generator = torch.Generator().manual_seed(0)
    return [{name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in tuning.state(model, recipe).items()}
            for _ in range(k)]


def test_lora_average_is_the_mean_of_the_updates(tiny_models) -> None:
    recipe = _recipe(tiny_models)
    model = tuning.prepare(load(str(tiny_models["llama"]))[0], recipe)
    states = _states(model, recipe, 3)
    layer = model.base_model.model.layers[1].self_attn.q_proj
    deltas = []
    for state in states:
        tuning.load_state(model, state, recipe)
        deltas.append(layer.get_delta_weight("default"))
    tuning.average(model, states, recipe)
    assert model.active_adapter == tuning.AVERAGE and model.peft_config[tuning.AVERAGE].r == 3 * recipe.lora.r
    torch.testing.assert_close(layer.get_delta_weight(tuning.AVERAGE), sum(deltas) / 3, rtol=1e-5, atol=1e-6)
    # Averaging the factors instead would not give it.
    tuning.use_trained(model, recipe)
    tuning.load_state(model, {n: sum(s[n] for s in states) / 3 for n in states[0]}, recipe)
    assert not torch.allclose(layer.get_delta_weight("default"), sum(deltas) / 3, atol=1e-4)


def test_full_average_is_the_mean_of_the_weights(tiny_models) -> None:
    recipe = _recipe(tiny_models, finetune="full")
    model = tuning.prepare(load(str(tiny_models["llama"]))[0], recipe)
    states = _states(model, recipe, 2)
    tuning.average(model, states, recipe)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, (states[0][name] + states[1][name]) / 2)


@pytest.mark.parametrize("select,average_last", [("best_dev", 2), ("last", 2), ("best_dev", 1)])
def test_selection_on_stsb_dev_keeps_what_it_says(tmp_path, tiny_models, data_dir, select, average_last) -> None:
    recipe = _recipe(tiny_models, dev_every=2, select=select, average_last=average_last)
    summary = train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    dev = summary["dev"]
    assert [s["step"] for s in dev["scores"]] == [2, 4, 6]
    logged = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert [r["stsb_dev"] for r in logged if "stsb_dev" in r] == [s["stsb_dev"] for s in dev["scores"]]
    candidates = {"last": dev["scores"][-1]["stsb_dev"], "best": max(s["stsb_dev"] for s in dev["scores"])}
    if average_last > 1:
        assert dev["average"]["steps"] == [4, 6]
        candidates["average"] = dev["average"]["stsb_dev"]
    if select == "last":
        assert dev["chosen"] == ("average" if average_last > 1 else "last")
    else:
        assert dev["stsb_dev"] == max(candidates.values())
    # The saved adapter is the chosen one: it scores what selection said, on STSBenchmark dev.
    tuned = load_embedder(None, adapter=tmp_path / "run", device=CPU, dtype=torch.float32)
    rescored = evaluate(tuned, {"dev": load_sts("STSBenchmark", str(data_dir), split="dev")})["average"]
    assert rescored == pytest.approx(dev["stsb_dev"], abs=0.02)
    rank = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["r"]
    assert rank == (2 * recipe.lora.r if dev["chosen"] == "average" else recipe.lora.r)
    kept = sorted(p.name for p in (tmp_path / "run/dev").glob("step-*.safetensors"))
    best = max(dev["scores"], key=lambda s: (s["stsb_dev"], s["step"]))["step"]
    assert kept == sorted({f"step-{s:07d}.safetensors" for s in [best, *[4, 6][2 - average_last:]]})


def test_selection_needs_dev_scores() -> None:
    data = Recipe().to_dict()
    data["train"]["select"] = "best_dev"
    with pytest.raises(SlmembedError, match=r"recipe: train.select: 'best_dev' needs STSBenchmark dev scores"):
        recipe_from_dict(data)
    data["train"]["dev_every"] = 10
    assert recipe_from_dict(data).train.select == "best_dev"


def _reference_loss(a, p, negatives, tau: float) -> float:
    """InfoNCE in float64 over the positives and the negatives that exist (None: absent)."""
    candidates = np.concatenate([p, np.array([n for n in negatives if n is not None])])
    logits = a @ candidates.T / tau
    logits -= logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits)))


@pytest.mark.parametrize("width", [3, 4])
def test_batch_loss_leaves_out_missing_negatives(width) -> None:
    """Examples without a hard negative (entailment-only pairs) or a neutral add no candidate; the rest do."""
    examples = [("a0", "p0", "n0", "u0"), ("a1", "p1", None, "u1"), ("a2", "p2", "n2", None), ("a3", "p3", None, None)]
    examples = [e[:width] for e in examples]
    texts = sorted({t for e in examples for t in e if t is not None})
    token_ids = {t: [i] for i, t in enumerate(texts)}
    cols = [0, 1, 2, 3][:width]
    batch = train_mod.StepBatch.of(examples, np.arange(4), cols, token_ids)
    vectors = torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=torch.Generator().manual_seed(1),
                                                        dtype=torch.float64), dim=-1)
    emb = vectors[[ids[0] for ids in batch.ids]]
    by_text = dict(zip(texts, vectors.numpy(), strict=True))
    rows = lambda c: np.stack([by_text[e[c]] for e in examples])  # noqa: E731
    negatives = [by_text.get(e[c]) if e[c] is not None else None for c in cols[2:] for e in examples]
    got = train_mod.batch_loss(objective("infonce"), batch, emb, 0.05)
    assert got.item() == pytest.approx(_reference_loss(rows(0), rows(1), negatives, 0.05), rel=1e-6)
    assert len(batch.ids) == 8 + sum(n is not None for n in negatives)


def test_batch_loss_with_every_negative_is_the_paper_loss() -> None:
    """All hard negatives present: no slots, no mask, and exactly info_nce(anchors, positives, negatives)."""
    examples = [(f"a{i}", f"p{i}", f"n{i}") for i in range(5)]
    token_ids = {t: [k] for k, t in enumerate(t for e in examples for t in e)}
    batch = train_mod.StepBatch.of(examples, np.arange(5), [0, 1, 2], token_ids)
    assert batch.slots is None and batch.present is None and batch.negatives == 5
    emb = torch.randn(15, 8, generator=torch.Generator().manual_seed(2))
    want = objective("infonce")(emb[:5], emb[5:10], emb[10:], 0.05)
    assert train_mod.batch_loss(objective("infonce"), batch, emb, 0.05).item() == pytest.approx(want.item(), rel=1e-6)
