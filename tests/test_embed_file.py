"""`embed`: text, CSV and JSONL files into .npy and Parquet, equal to direct embeddings; chunks resume, but only for
the same model files, dtype, spec, input and chunking (else refused, or started over with --force); bad rows are
named by line before the model loads."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from slmembed import atomic, cli
from slmembed import embed_file as ef
from slmembed.cli import main
from slmembed.data.texts import text_problem
from slmembed.errors import DataError, SlmembedError
from slmembed.loading import load_embedder

TEXTS = [f"sentence {i}: {'a cat sleeps on the mat' if i % 3 else 'rain falls over the quiet town'}" for i in range(11)]


@pytest.fixture(scope="module")
def embedder(tiny_models):
    return load_embedder(str(tiny_models["llama"]), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def expected(embedder) -> np.ndarray:
    return embedder.encode(TEXTS)


def _write(path, kind: str) -> None:
    if kind == "txt":
        path.write_text("\n".join(TEXTS) + "\n")
    elif kind == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "sentence"])
            writer.writerows([[i, t] for i, t in enumerate(TEXTS)])
    else:
        path.write_text("".join(json.dumps({"id": i, "sentence": t}) + "\n" for i, t in enumerate(TEXTS)))


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_files_embed_in_order(embedder, expected, tmp_path, kind, suffix) -> None:
    src, out = tmp_path / f"in.{kind}", tmp_path / f"out{suffix}"
    _write(src, kind)
    column = None if kind == "txt" else "sentence"
    summary = ef.embed_file(embedder, "tiny", src, out, column=column, chunk_size=4, progress=False)
    assert summary["texts"] == 11 and summary["chunks"] == 3 and summary["chunks_reused"] == 0
    if suffix == ".npy":
        got = np.load(out)
    else:
        table = pq.read_table(out)
        assert table.column("text").to_pylist() == TEXTS
        got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no sidecar, no temp files


def _killed(*args, **kwargs):
    raise KeyboardInterrupt  # the run dies after writing its chunks, before joining them


def _interrupted_run(embedder, tmp_path, monkeypatch) -> tuple:
    """A text file and an output path whose run died after writing its chunks of 4 texts."""
    src, out = tmp_path / "in.txt", tmp_path / "out.npy"
    _write(src, "txt")
    monkeypatch.setattr(ef, "_join", _killed)
    with pytest.raises(KeyboardInterrupt):
        ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)
    monkeypatch.undo()
    return src, out


def test_interrupted_run_resumes_from_its_chunks(embedder, expected, tmp_path, monkeypatch) -> None:
    src, out = _interrupted_run(embedder, tmp_path, monkeypatch)
    parts = tmp_path / "out.npy.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.npy", "00000001.npy", "00000002.npy",
                                                       "manifest.json"] and not out.exists()
    # As if killed while that chunk was being written: its write's marked temporary folder is left (atomic.py).
    (parts / "00000001.npy").unlink()
    killed = parts / ".00000001.npy.k1ll3d00.tmp"
    killed.mkdir()
    (killed / atomic.TEMP_MARKER).write_text("00000001.npy\n")
    (killed / "00000001.npy").write_bytes(b"\x93NUMPY half")
    summary = ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)
    assert summary["chunks_reused"] == 2
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert not parts.exists()


def test_sidecar_of_another_input_is_not_mixed_in(embedder, tmp_path, monkeypatch) -> None:
    src, out = _interrupted_run(embedder, tmp_path, monkeypatch)
    for model, chunk_size, what in (("other-model", 4, "model"), ("tiny", 5, "chunk size")):
        with pytest.raises(SlmembedError, match=f"differ from this run's in their {what}: rerun with --force"):
            ef.embed_file(embedder, model, src, out, chunk_size=chunk_size, progress=False)
    src.write_text("\n".join(reversed(TEXTS)) + "\n")  # same size, other texts
    with pytest.raises(SlmembedError, match="in their input: rerun with --force"):
        ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)


@pytest.mark.parametrize("name, content, column, message", [
    ("a.txt", "one\n\nthree\n", None, "a.txt:2: the line is empty; expected one text a line"),
    ("a.txt", "one\n \t \nthree\n", None, "a.txt:2: the line is only whitespace"),
    ("a.jsonl", '{"text": "ok"}\n{"text": 5}\n', None, "a.jsonl:2: expected an object with a string field 'text'"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "  "}\n', None, "a.jsonl:2: field 'text' is only whitespace"),
    ("a.jsonl", '{"text": "ok"}\n{bad\n', None, "a.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n', None, "a.jsonl:2: a string holds a lone surrogate"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "a\\udcff"}\n', None, "a.jsonl:2: field 'text' holds a lone surrogate"),
    ("a.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "\n", None, "a.jsonl:2: JSON nested too deeply"),
    ("a.jsonl", '{"text": "ok", "n": ' + "7" * 5000 + "}\n", None, "a.jsonl:1: not valid JSON: Exceeds the limit"),
    ("a.csv", "id,body\n1,hello\n", "text", "a.csv:1: no column 'text'; the header has ['id', 'body']"),
    ("a.csv", "\n\nid,body\n1,hello\n", "text", "a.csv:3: no column 'text'"),
    ("a.csv", "id,text\n1,hello\n2,\n", None, "a.csv:3: column 'text' is empty"),
    ("a.csv", "id,text\n1,hello\n2,  \n", None, "a.csv:3: column 'text' is only whitespace"),
    ("a.csv", "id,text\n1,hello\n2,hello, world\n", None, "a.csv:3: expected 2 comma-separated columns (id,text), "
                                                            "got 3"),
    ("a.csv", "text,id\n\"a\nb\",1\nhello\n", None, "a.csv:4: expected 2 comma-separated columns (text,id), got 1"),
])
def test_bad_rows_are_named_by_line(embedder, tmp_path, name, content, column, message) -> None:
    src = tmp_path / name
    src.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        ef.embed_file(embedder, "tiny", src, tmp_path / "out.npy", column=column, progress=False)
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.parts").exists()


def test_cli_embed(tiny_models, expected, tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    _write(src, "jsonl")
    out = tmp_path / "v.npy"
    args = ["embed", str(src), "--column", "sentence", "--output", str(out), "--model", str(tiny_models["llama"]),
            "--dtype", "float32"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 11
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert main([*args[:4], "--output", str(tmp_path / "v.csv"), *args[6:]]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_compact_vectors_are_sentence_transformers_own(embedder, expected, tmp_path, precision) -> None:
    """int8/uint8 take their ranges from the input itself, or from --calibration (an earlier float32 .npy, or
    texts); binary packs 8 dimensions a byte; Parquet keeps the integer type."""
    from sentence_transformers.util.quantization import quantize_embeddings

    src = tmp_path / "in.txt"
    _write(src, "txt")
    # The float vectors these chunks give (equal to ``expected`` up to rounding: a bucket edge can fall between
    # the two), quantised by sentence-transformers, are the reference.
    floats = np.load(ef.embed_file(embedder, "tiny", src, tmp_path / "f.npy", chunk_size=4, progress=False)["output"])
    np.testing.assert_allclose(floats, expected, atol=1e-5)
    out = ef.embed_file(embedder, "tiny", src, tmp_path / "v.npy", chunk_size=4, progress=False, precision=precision)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), quantize_embeddings(floats, precision))
    assert out["precision"] == precision and out["width"] == (32 if "int8" in precision else 4)
    table = pq.read_table(ef.embed_file(embedder, "tiny", src, tmp_path / "v.parquet", chunk_size=4, progress=False,
                                        precision=precision)["output"])
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  quantize_embeddings(floats, precision))
    if "int8" in precision:
        calibration = expected[:5] * 2
        ef.embed_file(embedder, "tiny", src, tmp_path / "c.npy", chunk_size=4, progress=False, precision=precision,
                      calibration=calibration, force=True)
        np.testing.assert_array_equal(np.load(tmp_path / "c.npy"),
                                      quantize_embeddings(floats, precision, calibration_embeddings=calibration))


def test_cli_calibration(tiny_models, embedder, tmp_path, capsys) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    src, floats = tmp_path / "in.txt", tmp_path / "corpus.npy"
    _write(src, "txt")
    model = ["--model", str(tiny_models["llama"]), "--dtype", "float32"]
    assert main(["embed", str(src), "--output", str(floats), *model]) == 0
    queries = tmp_path / "q.txt"
    queries.write_text("a cat\nthe town\n")
    assert main(["embed", str(queries), "--output", str(tmp_path / "q.npy"), "--precision", "int8",
                 "--calibration", str(floats), *model]) == 0  # queries in the corpus's buckets
    reference = quantize_embeddings(embedder.encode(["a cat", "the town"]), "int8",
                                    calibration_embeddings=np.load(floats))
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), reference)
    capsys.readouterr()
    for extra, message in ((["--precision", "binary", "--calibration", str(floats)], "use it with one of them"),
                           (["--precision", "int8", "--calibration", str(tmp_path / "none.npy")], "no such file")):
        assert main(["embed", str(queries), "--output", str(tmp_path / "x.npy"), *extra, *model]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    one = tmp_path / "one.txt"
    one.write_text("alone\n")
    assert main(["embed", str(one), "--output", str(tmp_path / "o.npy"), "--precision", "uint8", *model]) == 2
    assert "one text cannot set the ranges" in capsys.readouterr().err


def test_the_text_rule() -> None:
    """One rule for a text embed and the server take: None, or what keeps it from being embedded."""
    assert text_problem("a cat") is None and text_problem(" é \u200b😀") is None
    assert text_problem("") == "is empty" and text_problem(" \t\n\u00a0") == "is only whitespace"
    assert text_problem("ab\ud800") == "holds a lone surrogate ('\\ud800' at character 3), which is not UTF-8 text"


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_cli_refuses_bad_input_before_the_model_loads(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_load_model", _no_model)
    files = {"surrogate.jsonl": '{"text": "fine"}\n{"text": "bad \\ud800 text"}\n',
             "deep.jsonl": '{"text": "fine"}\n' + "[" * 100_000 + "\n",
             "comma.csv": "text\nfine\nhello, world\n", "blank.txt": "fine\n   \n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "folder").mkdir()
    cases = [
        ("surrogate.jsonl", [], "surrogate.jsonl:2: a string holds a lone surrogate ('\\ud800'), which is not UTF-8"),
        ("deep.jsonl", [], "deep.jsonl:2: JSON nested too deeply"),
        ("comma.csv", [], "comma.csv:3: expected 1 comma-separated columns (text), got 2"),
        ("blank.txt", [], "blank.txt:2: the line is only whitespace"),
        ("folder", [], "folder: is a folder; expected a file"),
        ("/dev/null", [], "/dev/null: is not a regular file (a device, pipe or socket); expected a file"),
        ("blank.txt", ["--precision", "int8", "--calibration", str(tmp_path / "folder")],
         f"--calibration {tmp_path / 'folder'}: is a folder; expected a file"),
    ]
    for name, extra, message in cases:
        out = tmp_path / "out.npy"
        assert main(["embed", str(tmp_path / name), "--output", str(out), "--model", "any", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("slmembed: error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / "out.npy.parts").exists()


def _changed(folder, seed: int) -> None:
    """Change the final norm's weights in ``folder``'s safetensors (as retraining or a re-export would)."""
    weights = load_file(folder / "model.safetensors")
    torch.manual_seed(seed)
    weights["model.norm.weight"] += torch.rand_like(weights["model.norm.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_other_weights_or_dtype_are_refused_and_force_starts_over(tiny_models, expected, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    """A rerun whose model files or dtype differ from the chunks' is refused in one line naming what differs; with
    --force it starts over, and its vectors are a fresh run's. The batch size does not matter."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    src, out = tmp_path / "in.txt", tmp_path / "out.npy"
    _write(src, "txt")
    run = ["embed", str(src), "--output", str(out), "--model", str(model), "--chunk-size", "4", "--device", "cpu"]
    monkeypatch.setattr(ef, "_join", _killed)
    assert main([*run, "--dtype", "float32", "--batch-size", "2"]) == 130  # killed once its chunks are written
    monkeypatch.undo()
    _changed(model, 0)
    capsys.readouterr()
    for extra, what in ((["--dtype", "bfloat16"], "weights, dtype"), (["--dtype", "float32"], "weights")):
        assert main([*run, *extra]) == 2
        err = capsys.readouterr().err
        assert err == (f"slmembed: error: {out}.parts holds chunks that differ from this run's in their {what}: rerun "
                       "with --force to start over\n")
    assert main([*run, "--dtype", "float32", "--force"]) == 0
    summary, err = json.loads(capsys.readouterr().out), capsys.readouterr().err
    assert summary["chunks_reused"] == 0 and summary["started_over"] == ["weights"]
    fresh = load_embedder(str(model), device=torch.device("cpu"), dtype=torch.float32).encode(TEXTS)
    np.testing.assert_allclose(np.load(out), fresh, atol=1e-5)
    assert np.abs(fresh - expected).max() > 0.05  # the change matters: mixed chunks would have been wrong

    monkeypatch.setattr(ef, "_join", _killed)
    assert main([*run, "--dtype", "float32", "--batch-size", "2", "--force"]) == 130
    monkeypatch.undo()
    assert main([*run, "--dtype", "bfloat16", "--force"]) == 0
    assert "in their dtype: starting over" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), load_embedder(str(model), device=torch.device("cpu"),
                                                           dtype=torch.bfloat16).encode(TEXTS), atol=1e-6)
    monkeypatch.setattr(ef, "_join", _killed)
    assert main([*run, "--dtype", "float32", "--batch-size", "2", "--force"]) == 130
    monkeypatch.undo()
    assert main([*run, "--dtype", "float32", "--batch-size", "5", "--force"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["chunks_reused"] == 3 and summary["started_over"] == []
    np.testing.assert_allclose(np.load(out), fresh, atol=1e-5)


def _lora(base, folder, seed: int) -> None:
    """A random LoRA adapter over ``base`` saved in ``folder``: a training run's adapter, trained again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModel.from_pretrained(base), config).save_pretrained(folder)


def test_a_retrained_adapter_is_not_mixed_in(tiny_models, tmp_path, monkeypatch) -> None:
    base, adapter = tiny_models["llama"], tmp_path / "adapter"
    _lora(base, adapter, 1)
    first = load_embedder(str(base), adapter, device=torch.device("cpu"), dtype=torch.float32)
    src, out = _interrupted_run(first, tmp_path, monkeypatch)
    _lora(base, adapter, 2)
    second = load_embedder(str(base), adapter, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(SlmembedError, match="in their weights: rerun with --force"):
        ef.embed_file(second, "tiny", src, out, chunk_size=4, progress=False)
    summary = ef.embed_file(second, "tiny", src, out, chunk_size=4, progress=False, force=True)
    assert summary["chunks_reused"] == 0 and summary["started_over"] == ["weights"]
    np.testing.assert_allclose(np.load(out), second.encode(TEXTS), atol=1e-5)
    assert np.abs(np.load(out) - first.encode(TEXTS)).max() > 0.05


def test_leftover_chunks_are_replaced_with_force_but_foreign_files_never(embedder, expected, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    """A sidecar left without its manifest (a run killed before writing it, or a second embed whose first removed
    it) holding only files embed writes is replaced with --force; a file embed did not write is named, not deleted."""
    src, out = _interrupted_run(embedder, tmp_path, monkeypatch)
    parts = tmp_path / "out.npy.parts"
    (parts / "manifest.json").unlink()
    killed = parts / ".00000003.npy.k2j4h_x1.tmp"  # a killed write of a chunk (atomic.py's marked folder)
    killed.mkdir()
    (killed / atomic.TEMP_MARKER).write_text("00000003.npy\n")
    (killed / "00000003.npy").write_bytes(b"half a chunk")
    with pytest.raises(SlmembedError, match="stopped before it recorded what they are: rerun with --force"):
        ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)
    summary = ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False, force=True)
    assert summary["started_over"] == ["manifest"] and summary["chunks_reused"] == 0
    assert "holds chunks without a manifest: starting over" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert not parts.exists()

    out.unlink()
    monkeypatch.setattr(ef, "_join", _killed)
    with pytest.raises(KeyboardInterrupt):
        ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)
    monkeypatch.undo()
    (parts / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(SlmembedError, match=f"{parts / 'notes.txt'} was not written by slmembed"):
            ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False, force=force)
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.npy", "00000001.npy", "00000002.npy",
                                                       "manifest.json", "notes.txt"]
