"""Embed a file of texts into ``.npy`` (float32 [N, D]) or Parquet (columns ``text`` and ``embedding``).

Input by suffix: ``.csv`` (a header row; ``column`` picks the column, default ``text`` or the only one), ``.jsonl`` /
``.ndjson`` (one object a line; ``column`` picks the field, default ``text``), anything else one text a line.
Row i of the output is the i-th text. The texts are cut into chunks of ``chunk_size``; each chunk's vectors are
written atomically into the sidecar folder ``OUT.parts/`` and skipped when the command runs again, so an
interrupted run continues where it stopped. At the end the chunks are joined into OUT (atomically) and the sidecar
is removed. The sidecar records the input (path, size, modification time), the model and the chunking, and a rerun
with other ones is refused rather than mixed in.

``precision`` int8, uint8, binary or ubinary writes compact vectors instead (quantize.py: int8 [N, D], binary
packed [N, D/8]); int8 and uint8 take their ranges from calibration embeddings (``load_calibration``: a text file
embedded, or the float32 ``.npy`` of an earlier embed, so that queries and a corpus share their buckets), else from
the input's own embeddings. The chunks stay float32, so a resumed run may change only the precision.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slmembed import outputs, quantize
from slmembed.atomic import atomic_path, write_json
from slmembed.data.jsonl import json_lines
from slmembed.embedder import Embedder, batching
from slmembed.errors import DataError, SlmembedError

OUTPUTS = (".npy", ".parquet")
METADATA_KEY = b"slmembed"  # in a Parquet output's schema: marks it as ours


def iter_texts(path: Path, column: str | None = None) -> Iterator[str]:
    """The texts of ``path`` in order; a row without a text is a DataError naming its line."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="" if suffix == ".csv" else None) as fh:
            if suffix == ".csv":
                yield from _csv_texts(path, fh, column)
            elif suffix in (".jsonl", ".ndjson"):
                yield from _jsonl_texts(path, fh, column or "text")
            else:
                if column:
                    raise SlmembedError(f"{path}: --column applies to CSV and JSONL files, not to text lines")
                for line_no, line in enumerate(fh, 1):
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        raise DataError(path, "empty line; expected one text a line", line_no)
                    yield text
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SlmembedError(f"cannot read {path}: {exc.strerror}") from None


def _csv_texts(path: Path, fh, column: str | None) -> Iterator[str]:
    reader = csv.DictReader(fh)
    fields = reader.fieldnames or []
    if column is None:
        column = "text" if "text" in fields or len(fields) != 1 else fields[0]
    if column not in fields:
        raise DataError(path, f"no column {column!r}; the header has {fields} (choose one with --column)", 1)
    for row in reader:
        text = row.get(column)
        if not text or not text.strip():
            raise DataError(path, f"column {column!r} is empty or missing", reader.line_num)
        yield text


def _jsonl_texts(path: Path, fh, field: str) -> Iterator[str]:
    for line_no, obj in json_lines(path, fh):
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, f"expected an object with a non-empty string field {field!r}", line_no)
        yield text


def _chunks(path: Path, column: str | None, size: int) -> Iterator[list[str]]:
    texts = iter_texts(path, column)
    while chunk := list(itertools.islice(texts, size)):
        yield chunk


def _ours(path: Path) -> bool:
    """Whether ``path`` is an earlier embed output: a 2-D float32 .npy, or a Parquet file carrying our metadata."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r")
            return array.ndim == 2 and array.dtype in (np.float32, np.int8, np.uint8)
        import pyarrow.parquet as pq

        return METADATA_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, ValueError, ImportError):
        return False


def check_output(input_path: str | Path, output: str | Path, *, model: str | None = None,
                 force: bool = False) -> None:
    """Check before any work that ``output`` (and its ``.parts`` sidecar) may be written (outputs.py)."""
    output, input_path = Path(output), Path(input_path)
    if not input_path.is_file():
        raise SlmembedError(f"{input_path}: no such file")
    outputs.check_file(output, "embed", inputs=[input_path, model], force=force, ours=_ours, suffixes=OUTPUTS)
    parts = _sidecar(output)
    if parts.exists() and not (parts / "manifest.json").is_file():
        raise SlmembedError(f"{parts} exists and is not the chunk folder of an unfinished embed: move it away")


def _sidecar(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def load_calibration(path: str | Path, embedder: Embedder, batch_size: int | None = None) -> np.ndarray:
    """Calibration embeddings [N, D]: a 2-D float ``.npy`` (an earlier float32 embed output) as it is, or the
    embeddings of a text, CSV or JSONL file's texts (as ``iter_texts`` reads them)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            vectors = np.load(path)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"not a .npy array ({exc})") from None
        if vectors.ndim != 2 or vectors.dtype.kind != "f" or len(vectors) < 2:
            raise DataError(path, f"expected float embeddings [N >= 2, D], got {vectors.dtype} {vectors.shape}")
        return vectors.astype(np.float32)
    texts = list(iter_texts(path))
    if len(texts) < 2:
        raise DataError(path, "calibration needs at least two texts")
    rows, tokens = batching(embedder, batch_size)
    return embedder.encode(texts, batch_size=rows, max_tokens=tokens)


def embed_file(embedder: Embedder, model_id: str, input_path: str | Path, output: str | Path, *,
               column: str | None = None, chunk_size: int = 4096, batch_size: int | None = None, force: bool = False,
               progress: bool = True, precision: str = "float32", calibration: np.ndarray | None = None) -> dict:
    """Embed ``input_path`` into ``output`` chunk by chunk (see the module docstring); return a summary. An earlier
    output is replaced only with ``force``. Batches as ``embedder.batching`` makes them."""
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    check_output(input_path, output, force=force)
    n = sum(len(chunk) for chunk in _chunks(input_path, column, chunk_size))  # validates every row before work
    if n == 0:
        raise DataError(input_path, "no texts")
    if precision in quantize.CALIBRATED and calibration is None and n < 2:
        raise DataError(input_path, f"{precision} needs calibration: one text cannot set the ranges")
    parts = _sidecar(output)
    stat = input_path.stat()
    manifest = {"input": str(input_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "column": column, "texts": n, "chunk_size": chunk_size, "model": model_id,
                "spec": embedder.spec.__dict__}
    if (parts / "manifest.json").exists():
        if json.loads((parts / "manifest.json").read_text()) != manifest:
            raise SlmembedError(f"{parts} holds chunks of another input, model or chunk size: delete it to start over")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(parts / "manifest.json", manifest)
    names = [parts / f"{k:08d}.npy" for k in range(-(-n // chunk_size))]
    rows, tokens = batching(embedder, batch_size)
    bar = tqdm(total=n, desc="embed", unit="text", disable=not progress)
    reused = 0
    for name, chunk in zip(names, _chunks(input_path, column, chunk_size)):
        if name.exists():
            reused += 1
        else:
            vectors = embedder.encode(chunk, batch_size=rows, max_tokens=tokens)
            with atomic_path(name) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, vectors)
        bar.update(len(chunk))
    bar.close()
    dim = int(np.load(names[0], mmap_mode="r").shape[1])
    bounds = None
    if precision in quantize.CALIBRATED:
        if calibration is not None and calibration.shape[1] != dim:
            raise SlmembedError(f"the calibration embeddings have {calibration.shape[1]} dimensions, the model {dim}")
        bounds = quantize.ranges(calibration if calibration is not None else _extremes(names))
    width = _join(names, output, n, input_path, column, chunk_size, precision, bounds)
    shutil.rmtree(parts)
    return {"input": str(input_path), "output": str(output), "texts": n, "dim": dim, "precision": precision,
            "width": width, "chunks": len(names), "chunks_reused": reused}


def _extremes(names: list[Path]) -> np.ndarray:
    """Each chunk's per-dimension minimum and maximum (one chunk in memory at a time), stacked: their
    ``quantize.ranges`` are the whole input's."""
    def ends(block: np.ndarray) -> np.ndarray:
        return np.vstack((block.min(axis=0), block.max(axis=0)))

    return np.vstack([ends(np.load(name)) for name in names])


def _join(names: list[Path], output: Path, n: int, input_path: Path, column: str | None, chunk_size: int,
          precision: str, bounds: np.ndarray | None) -> int:
    """Concatenate the chunk files, at ``precision``, into ``output`` (written atomically), one chunk in memory at a
    time; return the vectors' width."""
    blocks = (quantize.quantize(np.load(name), precision, bounds) for name in names)
    first = next(blocks)
    dim = first.shape[1]
    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=(n, dim))
            if hasattr(os, "posix_fallocate"):  # a full disk fails here, not as SIGBUS when the map is written
                with open(tmp, "rb+") as fh:
                    os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            start = 0
            for block in itertools.chain([first], blocks):
                out[start : start + len(block)] = block
                start += len(block)
            out.flush()
            del out
            return dim
        import pyarrow as pa
        import pyarrow.parquet as pq

        kind = pa.from_numpy_dtype(first.dtype)
        schema = pa.schema([("text", pa.string()), ("embedding", pa.list_(kind, dim))],
                           metadata={METADATA_KEY: b"slmembed embed"})
        with pq.ParquetWriter(tmp, schema) as writer:
            for block, chunk in zip(itertools.chain([first], blocks), _chunks(input_path, column, chunk_size)):
                flat = pa.array(block.reshape(-1), type=kind)
                writer.write_table(pa.table({"text": chunk, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                                            schema=schema))
