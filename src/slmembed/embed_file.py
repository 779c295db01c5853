"""Embed a file of texts into ``.npy`` (float32 [N, D]) or Parquet (columns ``text`` and ``embedding``).

Input by suffix: ``.csv`` (a header row; ``column`` picks the column, default ``text`` or the only one), ``.jsonl`` /
``.ndjson`` (one object a line; ``column`` picks the field, default ``text``), anything else one text a line.
Row i of the output is the i-th text. The texts are cut into chunks of ``chunk_size``; each chunk's vectors are
written atomically into the sidecar folder ``OUT.parts/`` and skipped when the command runs again, so an
interrupted run continues where it stopped. At the end the chunks are joined into OUT (atomically) and the sidecar
is removed. The sidecar records the input (path, size, modification time), the model and the chunking, and a rerun
with other ones is refused rather than mixed in.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slmembed import outputs
from slmembed.atomic import atomic_path, write_json
from slmembed.data.jsonl import json_lines
from slmembed.embedder import Embedder
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
            return array.ndim == 2 and array.dtype == np.float32
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


def embed_file(embedder: Embedder, model_id: str, input_path: str | Path, output: str | Path, *,
               column: str | None = None, chunk_size: int = 4096, batch_size: int = 64, force: bool = False,
               progress: bool = True) -> dict:
    """Embed ``input_path`` into ``output`` chunk by chunk (see the module docstring); return a summary. An earlier
    output is replaced only with ``force``."""
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    check_output(input_path, output, force=force)
    n = sum(len(chunk) for chunk in _chunks(input_path, column, chunk_size))  # validates every row before work
    if n == 0:
        raise DataError(input_path, "no texts")
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
    bar = tqdm(total=n, desc="embed", unit="text", disable=not progress)
    reused = 0
    for name, chunk in zip(names, _chunks(input_path, column, chunk_size)):
        if name.exists():
            reused += 1
        else:
            vectors = embedder.encode(chunk, batch_size=batch_size)
            with atomic_path(name) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, vectors)
        bar.update(len(chunk))
    bar.close()
    dim = int(np.load(names[0], mmap_mode="r").shape[1])
    _join(names, output, n, dim, input_path, column, chunk_size)
    shutil.rmtree(parts)
    return {"input": str(input_path), "output": str(output), "texts": n, "dim": dim, "chunks": len(names),
            "chunks_reused": reused}


def _join(names: list[Path], output: Path, n: int, dim: int, input_path: Path, column: str | None,
          chunk_size: int) -> None:
    """Concatenate the chunk files into ``output`` (written atomically), one chunk in memory at a time."""
    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
            start = 0
            for name in names:
                block = np.load(name)
                out[start : start + len(block)] = block
                start += len(block)
            out.flush()
            del out
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("text", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                           metadata={METADATA_KEY: b"slmembed embed"})
        with pq.ParquetWriter(tmp, schema) as writer:
            for name, chunk in zip(names, _chunks(input_path, column, chunk_size)):
                flat = pa.array(np.load(name).reshape(-1), type=pa.float32())
                writer.write_table(pa.table({"text": chunk, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                                            schema=schema))
