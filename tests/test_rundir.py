"""The run folder's one owner (run.RunDir) and embed.json's one schema (run.EmbedInfo), against run folders and exports
that an earlier slmembed wrote (tests/fixtures/v255a7e6, made by tests/fixtures/make_fixtures.py): they are found,
read and load as they did, giving the vectors recorded when they were made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slmembed import adapters, outputs
from slmembed.cli import main
from slmembed.errors import SlmembedError
from slmembed.export import export
from slmembed.loading import load_embedder
from slmembed.run import ENTRIES, Checkpoint, EmbedInfo, RunDir
from slmembed.spec import EmbedSpec

FIXTURES = Path(__file__).parent / "fixtures" / "v255a7e6"
CPU = torch.device("cpu")


@pytest.fixture
def old(tmp_path, monkeypatch) -> Path:
    """A copy of the fixtures, as the working folder: they name their base model by the relative path ``base``."""
    folder = shutil.copytree(FIXTURES, tmp_path / "v255a7e6")
    monkeypatch.chdir(folder)
    return folder


def test_run_dir_names_what_train_wrote(old) -> None:
    lora, full = RunDir("lora-run"), RunDir("full-run")
    for path in (lora.recipe_file, lora.embed_file, lora.log, lora.data_record, lora.summary_file, lora.dev_scores,
                 lora.snapshot(4), lora.adapter / "adapter_model.safetensors", full.model / "model.safetensors"):
        assert path.is_file(), path
    assert lora.tensorboard.is_dir() and not lora.reference.exists() and not lora.scores.exists()
    assert lora.snapshots() == [lora.dev / "step-0000004.safetensors"]
    assert lora.checkpoints() == [lora.checkpoint(2)] == [Path("lora-run/checkpoints/step-0000002")]
    ckpt = Checkpoint(lora.checkpoint(2))
    assert ckpt.step == 2 and json.loads(ckpt.state.read_text()) == {"step": 2}
    assert all(p.is_file() for p in (ckpt.weights("lora"), ckpt.optimizer, ckpt.rng))
    assert full.checkpoints() == [] and Checkpoint(full.checkpoint(7)).weights("full").name == "model.safetensors"
    # Everything train wrote is an entry the output marker lists, and the marker of that version listed them too
    # (but for the entries added since: the reference's vectors and the adapted model).
    for run in (lora, full):
        assert {p.name for p in run.path.iterdir()} - {outputs.MARKER} <= set(ENTRIES)
        marked = json.loads((run.path / outputs.MARKER).read_text())["entries"]
        assert set(marked) == set(ENTRIES) - {"reference.safetensors", "adapted"}


def test_run_dir_reads_the_run_back(old) -> None:
    lora, full = RunDir("lora-run"), RunDir("full-run")
    assert (lora.finetune, lora.weights) == ("lora", lora.adapter)
    assert (full.finetune, full.weights) == ("full", full.model)
    summary = json.loads((old / "lora-run/summary.json").read_text())
    assert lora.summary() == summary and lora.finished() == summary["steps"] == 4
    assert (lora.recipe().name, lora.recipe().model.prompt) == ("fixture", "This sentence: {}")
    assert full.recipe().train.finetune == "full"
    assert lora.info() == EmbedInfo("run", "base", EmbedSpec(prompt="This sentence: {}", max_length=32), "lora")
    assert RunDir(old).summary() is None and RunDir(old).finished() is None and RunDir(old).recipe() is None
    (old / "lora-run/summary.json").write_text('{"steps": ')  # a summary cut short: not finished
    assert lora.finished() is None
    with pytest.raises(SlmembedError, match="not a finished training run"):
        RunDir(old).info()


def test_find_takes_a_run_or_its_weights_folder_and_refuses_the_rest(old) -> None:
    for path, run in (("lora-run", "lora-run"), ("lora-run/adapter", "lora-run"), ("full-run/model", "full-run"),
                      (old / "full-run", "full-run")):
        assert RunDir.find(path).path.resolve() == (old / run).resolve()
    assert RunDir.locate("export-st") is None and RunDir.locate("nowhere") is None
    for path, message in (("export-st", "export-st: an exported model, not a training run folder"),
                          ("base", "base: not a training run folder"), ("lora-run/dev", "not a training run folder"),
                          ("nowhere", "nowhere: no such folder")):
        with pytest.raises(SlmembedError, match=message):
            RunDir.find(path)


def test_embed_json_has_one_schema_and_reads_earlier_files(old, tmp_path) -> None:
    st, onnx, adapter = EmbedInfo.read("export-st"), EmbedInfo.read("export-onnx"), EmbedInfo.read("export-adapter")
    assert (st.kind, st.merged, st.format, st.source_run, st.spec.append_eos) == ("export", True, "st", "lora-run",
                                                                                  False)
    assert (onnx.format, onnx.quantize, adapter.merged, adapter.spec.append_eos) == ("onnx", None, False, True)
    assert EmbedInfo.read("base") is None
    # Written back: a kind, the fields of its kind, and the same info when read.
    for name, info in {"lora-run": RunDir("lora-run").info(), "full-run": RunDir("full-run").info(),
                       "export-st": st, "export-onnx": onnx}.items():
        (tmp_path / name).mkdir()
        info.write(tmp_path / name)
        written = json.loads((tmp_path / name / "embed.json").read_text())
        old_file = json.loads((old / name / "embed.json").read_text())
        assert written == {"kind": info.kind, "finetune": info.finetune, **old_file}
        assert EmbedInfo.read(tmp_path / name) == info
    RunDir(tmp_path / "new").path.mkdir()
    RunDir(tmp_path / "new").write_info("base", EmbedSpec(pooling="mean"), "full")
    assert json.loads((tmp_path / "new/embed.json").read_text()) == {
        "kind": "run", "model": "base", "spec": EmbedSpec(pooling="mean").__dict__, "finetune": "full"}


@pytest.mark.parametrize("text", ['{"model": "base"}', "[1]", '{"model": "base", "spec": {"pooling": "max"}}',
                                  '{"kind": "soup", "model": "base", "spec": {}}', "{"])
def test_a_broken_embed_json_is_one_line_naming_it(tmp_path, text) -> None:
    (tmp_path / "embed.json").write_text(text)
    with pytest.raises(SlmembedError, match=r"embed\.json: expected") as caught:
        EmbedInfo.read(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_run_from_before_output_markers_is_trains(old) -> None:
    run = old / "lora-run"
    (run / outputs.MARKER).unlink()
    assert RunDir(run).holds_run() and outputs.written_by(run) == "train"
    assert not RunDir("export-st").holds_run()


def test_earlier_runs_and_exports_give_the_recorded_vectors(old) -> None:
    expected = json.loads((old / "expected.json").read_text())
    loaded = {(name, f"--adapter {name}"): load_embedder(None, adapter=name, device=CPU, dtype=torch.float32)
              for name in ("lora-run", "full-run", "export-adapter", "lora-run/adapter")}
    # A run, its weights folder or a kept adapter given as the model loads as what it is, as exports do.
    for name in ("lora-run", "full-run", "full-run/model", "export-adapter", "export-st", "export-onnx"):
        loaded[name, name] = load_embedder(name, device=CPU, dtype=torch.float32)
    for (name, how), embedder in loaded.items():
        vectors = embedder.encode(expected["texts"])
        want = np.array(expected["vectors"][Path(name).parts[0]])
        np.testing.assert_allclose(vectors, want, rtol=0, atol=1e-6, err_msg=how)


def test_embed_takes_a_full_fine_tuning_run(old) -> None:
    expected = json.loads((old / "expected.json").read_text())
    Path("texts.txt").write_text("\n".join(expected["texts"]) + "\n")
    assert main(["embed", "texts.txt", "--output", "out.npy", "--model", "full-run", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    np.testing.assert_allclose(np.load("out.npy"), np.array(expected["vectors"]["full-run"]), rtol=0, atol=1e-6)


def test_serving_adapters_takes_lora_runs_only(old) -> None:
    run = adapters._run(Path("lora-run/adapter"), allow_pickle=False)
    assert (run.folder, run.base, run.spec) == (Path("lora-run/adapter"), "base", RunDir("lora-run").info().spec)
    with pytest.raises(SlmembedError, match="full-run: a full fine-tuning run has no adapter"):
        adapters._run(Path("full-run"), allow_pickle=False)
    with pytest.raises(SlmembedError, match="export-adapter: an exported model, not a training run folder"):
        adapters._run(Path("export-adapter"), allow_pickle=False)


def test_an_earlier_run_exports_with_the_one_schema(old) -> None:
    meta = export("lora-run", "again", fmt="hf")
    assert json.loads(Path("again/embed.json").read_text()) == meta
    assert meta == {"kind": "export", **json.loads(Path("export-st/embed.json").read_text()), "finetune": "lora",
                    "format": "hf"}
    expected = json.loads(Path("expected.json").read_text())
    vectors = load_embedder("again", device=CPU, dtype=torch.float32).encode(expected["texts"])
    np.testing.assert_allclose(vectors, np.array(expected["vectors"]["export-st"]), rtol=0, atol=1e-6)
