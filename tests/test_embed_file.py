"""`embed`: text, CSV and JSONL files into .npy and Parquet, equal to direct embeddings; chunks resume; bad rows are
named by line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from slmembed import embed_file as ef
from slmembed.cli import main
from slmembed.embedder import load_embedder
from slmembed.errors import DataError, SlmembedError

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
    (parts / "00000001.npy").unlink()  # as if killed while that chunk was being written
    summary = ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)
    assert summary["chunks_reused"] == 2
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert not parts.exists()


def test_sidecar_of_another_input_is_not_mixed_in(embedder, tmp_path, monkeypatch) -> None:
    src, out = _interrupted_run(embedder, tmp_path, monkeypatch)
    for model, chunk_size in (("other-model", 4), ("tiny", 5)):
        with pytest.raises(SlmembedError, match="delete it to start over"):
            ef.embed_file(embedder, model, src, out, chunk_size=chunk_size, progress=False)
    src.write_text("\n".join(reversed(TEXTS)) + "\n")  # same size, other texts
    with pytest.raises(SlmembedError, match="delete it to start over"):
        ef.embed_file(embedder, "tiny", src, out, chunk_size=4, progress=False)


@pytest.mark.parametrize("name, content, column, message", [
    ("a.txt", "one\n\nthree\n", None, "a.txt:2: empty line"),
    ("a.jsonl", '{"text": "ok"}\n{"text": 5}\n', None, "a.jsonl:2: expected an object with a non-empty string"),
    ("a.jsonl", '{"text": "ok"}\n{bad\n', None, "a.jsonl:2: not valid JSON"),
    ("a.csv", "id,body\n1,hello\n", "text", "a.csv:1: no column 'text'; the header has ['id', 'body']"),
    ("a.csv", "id,text\n1,hello\n2,\n", None, "a.csv:3: column 'text' is empty"),
])
def test_bad_rows_are_named_by_line(embedder, tmp_path, name, content, column, message) -> None:
    src = tmp_path / name
    src.write_text(content)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
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
    out = ef.embed_file(embedder, "tiny", src, tmp_path / "v.npy", chunk_size=4, progress=False, precision=precision)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), quantize_embeddings(expected, precision))
    assert out["precision"] == precision and out["width"] == (32 if "int8" in precision else 4)
    table = pq.read_table(ef.embed_file(embedder, "tiny", src, tmp_path / "v.parquet", chunk_size=4, progress=False,
                                        precision=precision)["output"])
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  quantize_embeddings(expected, precision))
    if "int8" in precision:
        calibration = expected[:5] * 2
        ef.embed_file(embedder, "tiny", src, tmp_path / "c.npy", progress=False, precision=precision,
                      calibration=calibration, force=True)
        np.testing.assert_array_equal(np.load(tmp_path / "c.npy"),
                                      quantize_embeddings(expected, precision, calibration_embeddings=calibration))


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
