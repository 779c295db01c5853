"""LLM2Vec's adaptation stages (adapt.py): the MNTP and SimCSE objectives against plain-PyTorch formulas, the MLM
collator's masking, and a run that adapts, trains and loads back from its (moved) folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from slmembed import adapt, models, tuning
from slmembed import train as train_mod
from slmembed.cli import main
from slmembed.config import Recipe
from slmembed.data.sts import TASKS, load_all
from slmembed.embedder import Embedder
from slmembed.evaluate import evaluate
from slmembed.loading import load_embedder
from slmembed.losses.mntp import mntp_loss, predictors
from slmembed.losses.simcse import simcse_loss
from slmembed.reproduce import reproduce
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field.", "The market fell sharply today.",
         "A woman slices an onion in the kitchen.", "Children are playing football in the park."]


def test_mntp_loss_is_the_cross_entropy_of_the_previous_positions_logits_at_the_masked_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.full((2, 6), -100)
    masked = [(0, 2), (0, 5), (1, 1), (1, 3)]  # (row, position): predicted from position - 1
    for b, i in masked:
        labels[b, i] = (3 * b + i) % 11
    labels[1, 0] = 4  # position 0 has no position before it: left out
    expected = torch.stack([F.cross_entropy(logits[b, i - 1], labels[b, i]) for b, i in masked]).mean()
    assert mntp_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)
    other = logits.clone()
    used = {(b, i - 1) for b, i in masked}
    for b in range(2):
        for i in range(6):
            if (b, i) not in used:  # logits that predict no masked token: changing them changes nothing
                other[b, i] = torch.randn(11, dtype=torch.float64) * 5
    assert mntp_loss(other, labels).item() == pytest.approx(expected.item(), abs=1e-6)


def test_mntp_loss_of_the_predicting_positions_only_equals_the_full_one() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 13, dtype=torch.float64)
    labels = torch.where(torch.rand(3, 7) < 0.3, torch.randint(0, 13, (3, 7)), torch.tensor(-100))
    labels[0, 3] = 5  # at least one masked token
    assert mntp_loss(logits[predictors(labels)], labels).item() == pytest.approx(mntp_loss(logits, labels).item(),
                                                                                  abs=1e-12)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_the_head_on_chosen_positions_gives_the_lms_own_logits_there(cap) -> None:
    # Gemma 3's forward soft-caps its logits when the config asks: a tiny random one, with and without the cap.
    config = Gemma3TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=cap)
    torch.manual_seed(0)
    lm = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 6))
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[1, 5], labels[1, 1] = 7, 9, 3
    where = predictors(labels)
    with torch.no_grad():
        full = lm(input_ids=ids).logits[where]
        chosen = adapt.logits(lm, lm.get_decoder()(input_ids=ids).last_hidden_state[where])
    assert torch.allclose(chosen, full, atol=1e-5)
    assert cap is None or full.abs().max() < cap


def test_simcse_loss_is_info_nce_of_the_two_views() -> None:
    torch.manual_seed(1)
    first, second = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    a, b = first / first.norm(dim=1, keepdim=True), second / second.norm(dim=1, keepdim=True)
    logits = (a @ b.T / 0.05).numpy()
    expected = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
    assert simcse_loss(first, second, 0.05).item() == pytest.approx(expected, abs=1e-6)


def _embedder(tiny_models) -> tuple[torch.nn.Module, Embedder]:
    lm, tokenizer = models.load(str(tiny_models["llama"]), lm_head=True, attn_implementation="eager")
    spec = EmbedSpec(pooling="mean", attention="bidirectional", max_length=32)
    return lm, Embedder(lm.get_decoder(), tokenizer, spec, packed=False)


def test_the_two_views_are_equal_without_dropout_and_differ_with_it(tiny_models) -> None:
    lm, embedder = _embedder(tiny_models)
    ids = embedder.tokenize(TEXTS)
    first, second = adapt.views(embedder, ids, 4096)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    adapt.set_attention_dropout(lm, 0.3)
    lm.train()
    first, second = adapt.views(embedder, ids, 4096)
    assert (first - second).abs().max() > 1e-3


def test_the_collator_masks_about_the_asked_fraction_never_padding_and_is_seeded(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    models.give_pad_token(tokenizer)
    texts = [" ".join(TEXTS[: 1 + i % 5]) for i in range(200)]
    encoded = tokenizer(texts, truncation=True, max_length=64, return_special_tokens_mask=True)
    features = [{"input_ids": i, "special_tokens_mask": s}
                for i, s in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True)]
    batch = adapt.collator(tokenizer, 0.2, seed=3)(features)
    again = adapt.collator(tokenizer, 0.2, seed=3)(features)
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["labels"], again["labels"])
    assert tokenizer.mask_token is None  # the collator's copy got one, not the tokenizer the run keeps
    real = batch["attention_mask"].bool()
    lengths = torch.tensor([len(i) for i in encoded["input_ids"]])
    assert torch.equal(real.sum(1), lengths) and not real.all()  # there is padding, on the right
    chosen = batch["labels"] != -100
    assert not (chosen & ~real).any()  # padding is never chosen
    fraction = (chosen.sum() / real.sum()).item()
    assert abs(fraction - 0.2) < 0.02, fraction
    originals = torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in encoded["input_ids"]], batch_first=True,
                                                padding_value=tokenizer.pad_token_id)
    assert torch.equal(batch["labels"][chosen], originals[chosen])  # labels: the tokens as they were
    blank = tokenizer.convert_tokens_to_ids("_")
    assert ((batch["input_ids"] == blank) & chosen).sum() / chosen.sum() > 0.7  # ~80% become the mask token "_"
    assert torch.equal(batch["input_ids"][~chosen], originals[~chosen])


def test_mntp_lowers_its_loss_on_a_fixed_batch(tmp_path, tiny_models) -> None:
    # The tiny model's LM head scaled up: at its random init's scale no hidden state gives a logit above ~0.6, so no
    # adapter could lower the loss much.
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        lm.lm_head.weight.mul_(50)
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path / "model")
    recipe = _recipe(tiny_models, mntp_steps=20, simcse_steps=0, mntp_batch=16, mntp_lr=1e-2)
    recipe.model.name = str(tmp_path / "model")
    texts = sorted({" ".join(TEXTS[i: i + 2]) + f" {i}" for i in range(16)})  # one batch: every step takes them all
    torch.manual_seed(0)
    record = adapt.adapt(recipe, texts, RunDir(tmp_path / "run"), Accelerator(cpu=True), bf16=False)
    mntp = record["mntp"]
    assert mntp["steps"] == 20 and mntp["final_loss"] < mntp["first_loss"] - 1.0, mntp
    assert adapt.reuse(RunDir(tmp_path / "run")) == record  # a complete folder is reused
    weights = load_file(tmp_path / "run/adapted/model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # trained in float32, stored as the base is


def _recipe(tiny_models, **adapt_fields) -> Recipe:
    recipe = Recipe()
    recipe.model.name = str(tiny_models["llama"])
    recipe.model.max_length, recipe.model.attention, recipe.model.pooling = 32, "bidirectional", "mean"
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    for key, value in {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "lr": 1e-3, "save_every": 100,
                       "bf16": False, "log_every": 1}.items():
        setattr(recipe.train, key, value)
    for key, value in {"mntp_batch": 16, "simcse_batch": 16, "mntp_lr": 1e-3, "simcse_lr": 1e-3,
                       **adapt_fields}.items():
        setattr(recipe.adapt, key, value)
    return recipe


def test_a_run_adapts_trains_and_loads_back_from_its_moved_folder(tmp_path, tiny_models, data_dir,
                                                                  monkeypatch) -> None:
    recipe = _recipe(tiny_models, mntp_steps=3, simcse_steps=3)
    kept = {}
    finish = train_mod._finish
    monkeypatch.setattr(train_mod, "_finish", lambda *a, **k: kept.setdefault("embedder", a[3]) and finish(*a, **k))
    summary = train_mod.train(recipe, tmp_path / "run", data_dir=data_dir, progress=False)
    run = RunDir(tmp_path / "run")
    assert summary["adapt"]["mntp"]["steps"] == 3 and summary["adapt"]["simcse"]["steps"] == 3
    assert json.loads(run.embed_file.read_text())["model"] == "./adapted"
    base, adapted = load_file(tiny_models["llama"] / "model.safetensors"), load_file(run.adapted / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert base.keys() == adapted.keys() and not torch.equal(base[name], adapted[name].to(base[name].dtype))
    trained = kept["embedder"]
    trained.model.eval()
    expected = trained.encode(TEXTS)
    torch.testing.assert_close(load_embedder(None, run.path, device=torch.device("cpu"),
                                             dtype=torch.float32).encode(TEXTS), expected, rtol=0, atol=1e-5)
    moved = shutil.move(run.path, tmp_path / "elsewhere")
    assert RunDir(moved).info().model == str(tmp_path / "elsewhere" / "adapted")
    torch.testing.assert_close(load_embedder(str(moved), device=torch.device("cpu"),
                                             dtype=torch.float32).encode(TEXTS), expected, rtol=0, atol=1e-5)
    # The way a user takes it: a sentence-transformers folder of the adapted, trained model gives the same vectors.
    export = tmp_path / "export"
    assert main(["export", "--run", str(moved), "--output", str(export), "--format", "st", "--dtype", "float32"]) == 0
    st = SentenceTransformer(str(export), device="cpu", local_files_only=True)
    vectors = torch.from_numpy(st.encode(TEXTS, normalize_embeddings=True))
    assert float((vectors * torch.nn.functional.normalize(torch.as_tensor(expected), dim=-1)).sum(1).min()) > 0.9999


@pytest.mark.parametrize(("settings", "message"), [
    (["adapt.mntp_steps=-1", "model.attention=bidirectional"], "adapt.mntp_steps: expected an integer >= 0"),
    (["adapt.simcse_steps=3"], "model.attention: 'causal'; the adapt stages"),
])
def test_bad_adapt_settings_are_one_line_before_any_model_loads(tmp_path, tiny_models, monkeypatch, capsys,
                                                                settings: list[str], message: str) -> None:
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model loaded"))
    args = ["train", "--recipe", "smollm2-135m", "--set", f"model.name={tiny_models['llama']}", "--output",
            str(tmp_path / "run")]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slmembed: error:") and message in err and err.count("\n") == 1, err


def test_a_resumed_run_reuses_a_complete_adapted_model_and_redoes_a_missing_one(tmp_path, tiny_models, data_dir,
                                                                                 monkeypatch) -> None:
    recipe = _recipe(tiny_models, mntp_steps=2, simcse_steps=2)
    recipe.train.max_steps, recipe.train.save_every = 4, 2
    run = RunDir(tmp_path / "run")
    first = train_mod.train(recipe, run.path, data_dir=data_dir, progress=False)
    finished = load_file(run.adapter / "adapter_model.safetensors")
    stages = []
    stage = adapt._stage
    monkeypatch.setattr(adapt, "_stage", lambda *a, **k: stages.append(a[4]) or stage(*a, **k))
    for redo in (False, True):
        # The run as if interrupted after its step-2 checkpoint; redo: before its adapted model was written whole.
        for target in (run.adapter, run.summary_file, run.embed_file,
                       *([run.adapted] if redo else [])):
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        stages.clear()
        summary = train_mod.train(recipe, run.path, data_dir=data_dir, resume=True, progress=False)
        assert stages == (["mntp", "simcse"] if redo else []) and summary["adapt"] == first["adapt"]
        resumed = load_file(run.adapter / "adapter_model.safetensors")
        for key in finished:
            torch.testing.assert_close(resumed[key], finished[key], rtol=0, atol=1e-5)


def test_two_processes_adapt_on_their_shares_and_the_first_writes_the_model(tmp_path, tiny_models, data_dir) -> None:
    """Under torchrun (gloo, 2 CPU processes) the stages run on each process's share of every step, the gradients
    averaged (the SimCSE loss gathers both shares' views), and the run loads back over the adapted model."""
    import subprocess
    import sys

    recipe = _recipe(tiny_models, mntp_steps=2, simcse_steps=2)
    recipe.train.batch_size = 4
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slmembed",
         "train", "--recipe", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run"), "--data-dir",
         str(data_dir), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    summary = run.summary()
    assert summary["world_size"] == 2 and summary["adapt"] == json.loads((run.adapted / adapt.RECORD).read_text())
    assert all(np.isfinite(stage["last_loss"]) for stage in summary["adapt"].values())
    assert "adapt simcse step 2/2" in proc.stdout and proc.stdout.count("adapt simcse step 2/2") == 1  # the first
    vectors = load_embedder(str(run.path), device=torch.device("cpu"), dtype=torch.float32).encode(TEXTS)
    assert np.isfinite(vectors).all() and vectors.shape[0] == len(TEXTS)


def test_reproduce_scores_an_adapted_runs_last_weights_on_its_adapted_base(tmp_path, tiny_models, data_dir,
                                                                           few_pairs) -> None:
    # Two dev scores, the average of both kept: "last_weights" (the last step's snapshot, reported beside the choice)
    # must be scored on the run's adapted model, not on the recipe's original one.
    recipe = _recipe(tiny_models, mntp_steps=2, simcse_steps=0)
    recipe.train.max_steps, recipe.train.dev_every, recipe.train.average_last = 4, 2, 2
    result = reproduce(recipe, tmp_path / "out" / "tiny", tmp_path / "run", data_dir=str(data_dir), device="cpu")
    assert result["after"]["selected"]["chosen"] == "average"
    run, sets = RunDir(tmp_path / "run"), load_all(TASKS, str(data_dir))

    def scored(base: str) -> dict:
        embedder = load_embedder(base, device=torch.device("cpu"), **EmbedSpec.of(recipe.model).__dict__)
        embedder.model = tuning.prepare(embedder.model, recipe).eval()
        tuning.load_state(embedder.model, load_file(run.snapshot(4)), recipe)
        return evaluate(embedder, sets)

    adapted, original = scored(str(run.adapted)), scored(recipe.model.name)
    assert result["after"]["last_weights"]["scores"] == pytest.approx(adapted["scores"], abs=1e-6)
    assert result["after"]["last_weights"]["average"] != pytest.approx(original["average"], abs=1e-3)

