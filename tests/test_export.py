"""Export round trips on tiny trained runs: sentence-transformers and transformers folders, merged or with the adapter,
from left- and right-padding tokenizers; token ids, embeddings and STS scores must match slmembed's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

from slmembed.cli import main
from slmembed.config import Recipe
from slmembed.data.sts import load_all, load_sts
from slmembed.errors import SlmembedError
from slmembed.evaluate import evaluate
from slmembed.export import check_bidirectional, export, st_token_ids
from slmembed.loading import load_embedder
from slmembed.pooling import padded as pool
from slmembed.train import train

CPU = torch.device("cpu")
RUNS = {  # name: (base tokenizer's padding side, pooling, prompt)
    "right-last-prompt": ("right", "last", "Represent this sentence: {}"),
    "left-last-P1": ("left", "last", "P1"),  # text after {}: the tokenizer's chat template for sentence-transformers
    "left-last": ("left", "last", None),
    "left-mean": ("left", "mean", None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, data_dir) -> dict:
    """A short real training run per RUNS entry, on the tiny Llama with the SmolLM2 tokenizer padding as asked."""
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, (side, pooling, prompt) in RUNS.items():
        base = root / f"base-{side}"
        if not base.exists():
            shutil.copytree(tiny_models["llama"], base)
            tokenizer = AutoTokenizer.from_pretrained(base)
            tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = side
            tokenizer.save_pretrained(base)
            assert AutoTokenizer.from_pretrained(base).padding_side == side
        out[name] = _short_run(base, root / name, data_dir, pooling=pooling, prompt=prompt)
    return out


def _short_run(base: Path, run: Path, data_dir, **model_fields) -> Path:
    """Four steps of 8 triplets on ``base`` into ``run``, the recipe's model section given ``model_fields``."""
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(base), 24
    for key, value in model_fields.items():
        setattr(recipe.model, key, value)
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    recipe.train.batch_size, recipe.train.max_steps, recipe.train.warmup_steps = 8, 4, 1
    recipe.train.lr, recipe.train.bf16 = 5e-3, False
    train(recipe, run, data_dir=str(data_dir), progress=False)
    return run


@pytest.fixture(scope="module")
def stsb_texts(data_dir) -> list[str]:
    sts = load_sts("STSBenchmark", str(data_dir))
    return sorted({*sts.sentences1, *sts.sentences2}) + ["a sentence far longer than the maximum length " * 8]


def _reference(run):
    return load_embedder(None, adapter=run, device=CPU, dtype=torch.float32)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_sentence_transformers_round_trip(runs, stsb_texts, tmp_path, name) -> None:
    out = tmp_path / "st"
    export(runs[name], out)
    _, pooling, prompt = RUNS[name]
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode"] == {"last": "lasttoken"}.get(
        pooling, pooling)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    suffix = bool(prompt) and not prompt.endswith("{}")
    assert st_config["default_prompt_name"] == ("default" if prompt and not suffix else None)
    modalities = json.loads((out / "sentence_bert_config.json").read_text())["modality_config"]
    assert ("message" in modalities) == suffix
    assert ("one text a call" in (AutoTokenizer.from_pretrained(out).chat_template or "")) == suffix  # ours

    texts = stsb_texts[::5] + stsb_texts[-1:]  # every STSB sentence: bench/export_check.py on the real model
    reference = _reference(runs[name])
    model = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert st_token_ids(model, texts) == reference.tokenize(texts)  # EOS appended, truncated alike
    expected = reference.encode(texts)
    right = model.encode(texts, batch_size=64)
    assert _min_cosine(right, expected) >= 0.999
    model.tokenizer.padding_side = "left"  # padding must not matter
    assert _min_cosine(model.encode(texts, batch_size=64), expected) >= 0.999
    back = load_embedder(str(out), device=CPU, dtype=torch.float32)  # slmembed reads the folder back alike
    back.tokenizer.padding_side = "left"
    assert back.tokenize(texts) == reference.tokenize(texts)
    assert _min_cosine(back.encode(texts), expected) >= 0.999


def test_transformers_format_and_unmerged_adapter(runs, tmp_path) -> None:
    run = runs["right-last-prompt"]
    texts = ["A man is playing a guitar.", "Hi", "Two dogs run across a snowy field near the old barn."]
    reference = _reference(run)
    expected = reference.encode(texts)

    hf = tmp_path / "hf"
    export(run, hf, fmt="hf")
    assert not (hf / "modules.json").exists()
    tokenizer, model = AutoTokenizer.from_pretrained(hf), AutoModel.from_pretrained(hf, dtype=torch.float32)
    batch = tokenizer([f"Represent this sentence: {t}" for t in texts], padding=True, truncation=True,
                      return_tensors="pt")
    with torch.no_grad():
        vecs = pool(model(**batch).last_hidden_state, batch["attention_mask"], "last")
    assert _min_cosine(torch.nn.functional.normalize(vecs, dim=-1).numpy(), expected) >= 0.999
    assert _min_cosine(load_embedder(str(hf), device=CPU, dtype=torch.float32).encode(texts), expected) >= 0.999

    for fmt in ("st", "hf"):
        kept = tmp_path / f"{fmt}-adapter"
        export(run, kept, fmt=fmt, merge=False)
        assert (kept / "adapter_model.safetensors").exists() and not (kept / "model.safetensors").exists()
        back = load_embedder(None, adapter=kept, device=CPU, dtype=torch.float32)
        assert _min_cosine(back.encode(texts), expected) >= 0.999
        if fmt == "st":
            loaded = SentenceTransformer(str(kept), device="cpu", local_files_only=True)
            assert _min_cosine(loaded.encode(texts), expected) >= 0.999


def test_model_card_scores_from_eval_or_reproduce_json(runs, data_dir, tmp_path) -> None:
    run = runs["left-last"]
    sets = load_all(["STS17", "BIOSSES"], str(data_dir))
    out = tmp_path / "evaluated"
    export(run, out, evaluate_sets=sets)
    exported = json.loads((out / "eval.json").read_text())
    assert exported["scores"] == evaluate(load_embedder(str(out)), sets)["scores"]
    # The same scores as the run itself (float32: bf16 rounds a merged and an unmerged tiny model differently).
    direct = evaluate(_reference(run), sets)["scores"]
    again = evaluate(load_embedder(str(out), device=CPU, dtype=torch.float32), sets)["scores"]
    assert again == pytest.approx(direct, abs=0.1)
    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card
    assert f"| STS17 | {exported['scores']['STS17']:.2f} |" in card

    reproduce = tmp_path / "repro.json"
    reproduce.write_text(json.dumps({"before": {"scores": {"BIOSSES": 1.5}, "average": 1.5},
                                     "after": {"scores": {"BIOSSES": 42.25}, "average": 42.25}}))
    export(run, tmp_path / "carded", scores=reproduce)
    card = (tmp_path / "carded/README.md").read_text()
    assert "| BIOSSES | 1.50 | 42.25 |" in card and str(reproduce) in card
    assert "## Training" in card and "LoRA r=8" in card


def test_bad_exports_are_refused(runs, tmp_path) -> None:
    with pytest.raises(SlmembedError, match="not a training run folder"):
        export(tmp_path, tmp_path / "out")
    run = tmp_path / "suffix-run"
    shutil.copytree(runs["left-last"], run)
    saved = json.loads((run / "embed.json").read_text())
    saved["spec"]["prompt"] = "P1"  # text after {}: sentence-transformers' prompts are prefixes
    (run / "embed.json").write_text(json.dumps(saved))
    export(run, tmp_path / "out", fmt="hf")  # slmembed applies the whole template itself
    back = load_embedder(str(tmp_path / "out"), device=CPU, dtype=torch.float32)
    assert back.tokenize(["a cat"]) == _reference(run).tokenize(["a cat"])
    model = SentenceTransformer(str(_exported_st(run, tmp_path / "st")), device="cpu")
    with pytest.raises(Exception, match="one text a call"):  # a prompt= would arrive as a system message
        model.encode(["a cat"], prompt="Query: ")


def _exported_st(run: Path, out: Path) -> Path:
    export(run, out)
    return out


def test_cli_export(runs, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["export", "--run", str(runs["left-mean"]), "--output", str(out), "--format", "hf"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["pooling"] == "mean" and (out / "model.safetensors").exists()
    assert main(["export", "--run", str(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a training run folder" in err


# Bidirectional runs (attention.py): (architecture, padding side, pooling). Gemma-3's 16-token sliding window becomes
# |i - j| < 9 once bidirectional, and STSB sentences are longer: the window is part of what must survive the export.
BIDIRECTIONAL_RUNS = {"llama": ("right", "mean"), "gemma3_text": ("left", "last")}


@pytest.fixture(scope="module")
def bidirectional_runs(tmp_path_factory, tiny_models, data_dir) -> dict:
    root = tmp_path_factory.mktemp("bidirectional-runs")
    out = {}
    for arch, (side, pooling) in BIDIRECTIONAL_RUNS.items():
        base = root / f"base-{arch}"
        if arch in tiny_models:
            shutil.copytree(tiny_models[arch], base)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
            config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=8, sliding_window=16, query_pre_attn_scalar=10,
                                      layer_types=["sliding_attention", "full_attention"], vocab_size=len(tokenizer),
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(base)
            tokenizer.save_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = side
        tokenizer.save_pretrained(base)
        out[arch] = _short_run(base, root / arch, data_dir, pooling=pooling, attention="bidirectional")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(BIDIRECTIONAL_RUNS))
def test_bidirectional_export_loads_bidirectional_everywhere(bidirectional_runs, stsb_texts, tmp_path, arch) -> None:
    """sentence-transformers and plain transformers, one text alone (no padding, the mask-free kernel) or padded
    batches, give the run's own bidirectional vectors; without remote code."""
    run = bidirectional_runs[arch]
    assert json.loads((run / "embed.json").read_text())["spec"]["attention"] == "bidirectional"
    reference = _reference(run)
    assert reference.spec.attention == "bidirectional" and not reference.causal
    texts = stsb_texts[::25] + stsb_texts[-1:]
    expected = reference.encode(texts)
    causal = load_embedder(None, adapter=run, device=CPU, dtype=torch.float32, attention="causal").encode(texts)
    assert _min_cosine(causal, expected) < 0.99  # so the comparisons below tell the two apart

    out = tmp_path / "st"
    meta = export(run, out)
    assert meta["spec"]["attention"] == "bidirectional"
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in ("is_causal", "use_bidirectional_attention", "sliding_window")} == {
        "llama": {"is_causal": False, "use_bidirectional_attention": None, "sliding_window": None},
        "gemma3_text": {"is_causal": None, "use_bidirectional_attention": True, "sliding_window": 16}}[arch]
    card = (out / "README.md").read_text()
    assert "Attention: bidirectional" in card and "without remote code" in card
    model = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    alone = np.concatenate([model.encode([t]) for t in texts])
    assert _min_cosine(alone, expected) >= 0.999
    assert _min_cosine(model.encode(texts, batch_size=64), expected) >= 0.999
    model.tokenizer.padding_side = "left"
    assert _min_cosine(model.encode(texts, batch_size=64), expected) >= 0.999
    back = load_embedder(str(out), device=CPU, dtype=torch.float32)  # embed.json's spec switches it, too
    assert back.spec.attention == "bidirectional" and not back.causal
    assert _min_cosine(back.encode(texts), expected) >= 0.999

    hf = tmp_path / "hf"
    export(run, hf, fmt="hf")
    tokenizer, plain = AutoTokenizer.from_pretrained(hf), AutoModel.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        for rows in ([0], [1], [len(texts) - 1], list(range(len(texts)))):  # alone (unpadded), and a padded batch
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, return_tensors="pt")
            vecs = pool(plain(**batch).last_hidden_state, batch["attention_mask"], reference.spec.pooling)
            assert _min_cosine(torch.nn.functional.normalize(vecs, dim=-1).numpy(), expected[rows]) >= 0.999

    with pytest.raises(SlmembedError, match="cannot be exported unmerged"):
        export(run, tmp_path / "st-adapter", merge=False)
    kept = tmp_path / "hf-adapter"
    export(run, kept, fmt="hf", merge=False)
    assert _min_cosine(load_embedder(None, adapter=kept, device=CPU, dtype=torch.float32).encode(texts),
                       expected) >= 0.999
    flags = {"llama": {"is_causal": False},
             "gemma3_text": {"use_bidirectional_attention": True, "sliding_window": 9}}[arch]
    card = (kept / "README.md").read_text()
    assert "; ".join(f"config.{k} = {v!r}" for k, v in flags.items()) in card
    base = json.loads((run / "embed.json").read_text())["model"]
    config = AutoConfig.from_pretrained(base)
    for name, value in flags.items():  # as the card says
        setattr(config, name, value)
    direct = AutoModel.from_pretrained(kept, dtype=torch.float32)  # transformers' own adapter loading: causal
    for adapted, bidirectional in (
            (PeftModel.from_pretrained(AutoModel.from_pretrained(base, config=config, dtype=torch.float32), str(kept)),
             True),
            (PeftModel.from_pretrained(AutoModel.from_pretrained(base, dtype=torch.float32), str(kept)), False),
            (direct, False)):
        adapted.eval()
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            vecs = pool(adapted(**batch).last_hidden_state, batch["attention_mask"], reference.spec.pooling)
        cosine = _min_cosine(torch.nn.functional.normalize(vecs, dim=-1).numpy(), expected)
        assert cosine >= 0.999 if bidirectional else cosine < 0.99  # the card's keywords are needed


def test_an_export_that_reloads_causal_is_refused(bidirectional_runs, tmp_path) -> None:
    run = bidirectional_runs["llama"]
    out = tmp_path / "hf"
    export(run, out, fmt="hf")
    check_bidirectional(out, _reference(run))
    config = json.loads((out / "config.json").read_text())
    del config["is_causal"]  # as if the architecture ignored the flag
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlmembedError, match="causal attention"):
        check_bidirectional(out, _reference(run))


GATE_SETS = ["STSBenchmark", "SICK-R"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["right-last-prompt", "left-mean"])
def test_onnx_export_scores_like_pytorch_and_loads_back(runs, stsb_texts, data_dir, tmp_path, name) -> None:
    """--format onnx: one graph (backbone, pooling, normalisation) that onnxruntime runs to the run's own vectors;
    the export's check scores both on the STS sets and writes the drop into eval.json and the card."""
    from slmembed.onnx_model import OnnxEmbedder

    out = tmp_path / "onnx"
    meta = export(runs[name], out, fmt="onnx", evaluate_sets=load_all(GATE_SETS, str(data_dir)))
    assert meta["format"] == "onnx" and meta["quantize"] is None
    assert (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    gate = json.loads((out / "eval.json").read_text())["onnx_check"]
    assert list(gate["onnx"]["scores"]) == GATE_SETS and abs(gate["drop"]) <= 0.02
    assert gate["onnx"]["sentences_per_s"] > 0 and gate["pytorch"]["sentences_per_s"] > 0
    card = (out / "README.md").read_text()
    assert f"Drop: {gate['drop']:.2f} points, within" in card and "onnxruntime.InferenceSession" in card

    texts = stsb_texts[::10] + stsb_texts[-1:]
    reference = _reference(runs[name])
    back = load_embedder(str(out))
    assert isinstance(back, OnnxEmbedder) and back.tokenize(texts) == reference.tokenize(texts)
    expected = reference.encode(texts)
    assert _min_cosine(back.encode(texts, batch_size=16), expected) >= 0.9999  # batches of any size and width
    assert _min_cosine(back.encode(texts[:1]), expected[:1]) >= 0.9999
    assert back.weights == "onnx float32" and back.vocab_size == reference.vocab_size
    assert back.session.get_session_options().intra_op_num_threads == torch.get_num_threads()  # torch's share

    from fastapi.testclient import TestClient

    from slmembed.adapters import Single
    from slmembed.serve import create_app

    with TestClient(create_app(Single(back, "onnx"))) as client:  # serve runs the folder too
        reply = client.post("/v1/embeddings", json={"model": "onnx", "input": texts[:3]})
    assert reply.status_code == 200, reply.text
    served = np.array([row["embedding"] for row in reply.json()["data"]], dtype=np.float32)
    assert _min_cosine(served, expected[:3]) >= 0.9999
    eval_json = tmp_path / "eval-onnx.json"
    assert main(["eval", "--model", str(out), "--tasks", "STSBenchmark", "--output", str(eval_json),
                 "--data-dir", str(data_dir)]) == 0
    assert json.loads(eval_json.read_text())["dtype"] == "onnx float32"
    assert main(["eval", "--model", str(out), "--tasks", "STSBenchmark", "--compile", "--data-dir",
                 str(data_dir)]) == 2


@pytest.mark.slow
def test_onnx_export_of_a_bidirectional_gemma3_run(bidirectional_runs, stsb_texts, data_dir, tmp_path) -> None:
    """The graph keeps the run's bidirectional attention and Gemma-3's (widened) sliding window."""
    run = bidirectional_runs["gemma3_text"]
    export(run, tmp_path / "onnx", fmt="onnx", evaluate_sets=load_all(GATE_SETS[:1], str(data_dir)))
    texts = stsb_texts[::25] + stsb_texts[-1:]
    assert _min_cosine(load_embedder(str(tmp_path / "onnx")).encode(texts), _reference(run).encode(texts)) >= 0.9999


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory, tiny_models, data_dir) -> Path:
    """A short run on the tiny Llama rewritten to compute the same function with one input of every product that reads
    the hidden state scaled down 1000x and its weights scaled up 1000x. float32 does not notice; int8 weights, one
    scale per output channel, round every other weight of the attention's and the MLP's inputs to zero."""
    root = tmp_path_factory.mktemp("outlier")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[0] /= 1000
                for module in readers:
                    module.weight[:, 0] *= 1000
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(root / "base")
    return _short_run(root / "base", root / "run", data_dir)


def test_onnx_gate_refuses_a_drop_above_the_margin(outlier_run, data_dir, tmp_path, capsys) -> None:
    """int8 costs this model about 2.5 points: a margin of 0.5 refuses the export (one line, exit 2, nothing
    written); --accept-drop writes it and says so on the card."""
    out = tmp_path / "int8"
    args = ["export", "--run", str(outlier_run), "--output", str(out), "--format", "onnx", "--quantize", "int8",
            "--max-drop", "0.5", "--tasks", *GATE_SETS, "--data-dir", str(data_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err  # the check's progress bars, then one line
    assert "above --max-drop 0.5; nothing was written" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main([*args, "--accept-drop"]) == 0
    gate = json.loads((out / "eval.json").read_text())["onnx_check"]
    assert gate["quantize"] == "int8" and gate["drop"] > 0.5
    assert "**above** (exported with --accept-drop)" in (out / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int8"], "are for --format onnx"),
    (["--format", "onnx", "--no-merge"], "drop --no-merge"),
    (["--format", "onnx", "--dtype", "bfloat16"], "drop --no-merge and --dtype"),
    (["--format", "onnx", "--max-drop", "-1"], "--max-drop: expected points >= 0"),
    (["--format", "onnx", "--max-drop", "nan"], "--max-drop: expected points >= 0, got nan"),  # no drop exceeds NaN
])
def test_bad_onnx_requests_are_refused_before_any_work(runs, tmp_path, capsys, extra, message) -> None:
    assert main(["export", "--run", str(runs["left-last"]), "--output", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "o").exists()
