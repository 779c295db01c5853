"""Embed a file of texts into ``.npy`` (float32 [N, D]) or Parquet (columns ``text`` and ``embedding``).

Input by suffix: ``.csv`` (a header row; ``column`` picks the column, default ``text`` or the only one; every row has
the header's number of fields: csvrows.py), ``.jsonl`` / ``.ndjson`` (one object a line; ``column`` picks the field,
default ``text``), anything else one text a line. Blank lines (CSV: rows of blank fields) are skipped; any other
text must be one we embed (data/texts.py), else the run stops before any work, naming the line. Row i of the output
is the i-th text. The texts are cut into chunks of ``chunk_size``; each chunk's vectors are written atomically into
the sidecar folder ``OUT.parts/`` and skipped when the command runs again, so an interrupted run continues where it
stopped. At the end the chunks are joined into OUT (atomically) and the sidecar is removed.

The sidecar's manifest records what makes the vectors: the model (its id and the sha256 of the files its weights
were read from: digest.py), the dtype it computes with, its spec, the input (the sha256 of its bytes, the column)
and the chunking. A rerun for which any of them differs is refused, naming them, rather than mixed in; with
``force`` it starts over. The batch size and the device are not recorded: they change vectors only by float noise
(the dtype auto picks per device is recorded, though). The sidecar holds only files embed writes (``_OURS``); a
sidecar without a manifest (a run stopped before it wrote one) is replaced with ``force``, and a sidecar holding
any other file is never touched.

``precision`` int8, uint8, binary or ubinary writes compact vectors instead (quantize.py: int8 [N, D], binary
packed [N, D/8]); int8 and uint8 take their ranges from calibration embeddings (``load_calibration``: a text file
embedded, or the float32 ``.npy`` of an earlier embed, so that queries and a corpus share their buckets), else from
the input's own embeddings. The chunks stay float32, so a resumed run may change only the precision.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slmembed import outputs, quantize
from slmembed.atomic import atomic_path, clean_leftovers, temporary_target, write_json
from slmembed.data.csvrows import CsvRows
from slmembed.data.jsonl import json_lines
from slmembed.data.texts import text_problem
from slmembed.digest import file_sha256, weights_sha256
from slmembed.errors import DataError, SlmembedError
from slmembed.paths import input_file

if TYPE_CHECKING:
    from slmembed.embedder import Embedder

# The embedder's module (torch) is imported by the functions that encode, so that ``check_output`` and
# ``count_texts`` answer before it loads.

OUTPUTS = (".npy", ".parquet")
METADATA_KEY = b"slmembed"  # in a Parquet output's schema: marks it as ours
MANIFEST = "manifest.json"
# What embed writes in a sidecar: its manifest and its chunks (each through an atomic.py temporary folder).
_OURS = re.compile(r"manifest\.json|\d{8}\.npy")
_NAMES = {"chunk_size": "chunk size", "texts": "input"}  # manifest keys as a refusal names them


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
                    yield _checked(path, line.rstrip("\r\n"), "the line", line_no, "; expected one text a line")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SlmembedError(f"cannot read {path}: {exc.strerror}") from None


def _checked(path: Path, text: str, name: str, line: int, expected: str = "") -> str:
    """``text``, if it is one we embed (``text_problem``); else a DataError naming it and its line."""
    problem = text_problem(text)
    if problem:
        raise DataError(path, f"{name} {problem}{expected}", line)
    return text


def _csv_texts(path: Path, fh, column: str | None) -> Iterator[str]:
    rows = CsvRows(path, fh)
    fields = rows.header
    if column is None:
        column = "text" if "text" in fields or len(fields) != 1 else fields[0]
    if column not in fields:
        raise DataError(path, f"no column {column!r}; the header has {fields} (choose one with --column)", rows.line)
    for line, row in rows:
        if isinstance(row, str):
            raise DataError(path, row, line)
        yield _checked(path, row[column], f"column {column!r}", line)


def _jsonl_texts(path: Path, fh, field: str) -> Iterator[str]:
    for line_no, obj in json_lines(path, fh):
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(path, f"expected an object with a string field {field!r}", line_no)
        yield _checked(path, text, f"field {field!r}", line_no)


def count_texts(path: str | Path, column: str | None = None) -> int:
    """The number of texts in ``path``, every row checked (``iter_texts``); no texts is a DataError."""
    n = sum(1 for _ in iter_texts(Path(path), column))
    if n == 0:
        raise DataError(path, "no texts")
    return n


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


def check_output(input_path: str | Path, output: str | Path, *, reads: Iterable[str | Path | None] = (),
                 force: bool = False) -> None:
    """Check before any work that ``input_path`` is a file and that ``output`` and its ``.parts`` sidecar may be
    written (outputs.py; the module docstring); ``reads``: the command's other inputs (the model, calibration),
    which the output may not be either."""
    output, input_path = Path(output), input_file(input_path)
    outputs.check_file(output, "embed", inputs=[input_path, *reads], force=force, ours=_ours, suffixes=OUTPUTS)
    parts = _sidecar(output)
    if not parts.exists():
        return
    if not parts.is_dir():
        raise SlmembedError(f"{parts} exists and is not the chunk folder of an unfinished embed: move it away")
    foreign = next((p for p in sorted(parts.iterdir()) if not _ours_in_sidecar(p)), None)
    if foreign is not None:
        raise SlmembedError(f"{foreign} was not written by slmembed, so embed neither uses nor deletes its chunk "
                            f"folder {parts}: move it away")
    if not force and not (parts / MANIFEST).is_file() and any(parts.iterdir()):
        raise SlmembedError(f"{parts} holds chunks of an embed stopped before it recorded what they are: rerun with "
                            "--force to start over")


def _sidecar(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _ours_in_sidecar(path: Path) -> bool:
    """Whether ``path`` in a sidecar is embed's: its manifest or a chunk, or the temporary folder of a write of one
    (a killed run's, which the next run removes)."""
    if path.is_dir() and not path.is_symlink():
        return _OURS.fullmatch(temporary_target(path) or "") is not None
    return path.is_file() and _OURS.fullmatch(path.name) is not None


def _clear(parts: Path) -> None:
    """Delete the files embed wrote in ``parts`` (``_OURS``), then the folder if that left it empty."""
    for path in parts.iterdir():
        if path.is_file() and _OURS.fullmatch(path.name):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # someone put a file there meanwhile: it stays, and the next run names it
        parts.rmdir()


def _differences(parts: Path, manifest: dict) -> list[str]:
    """What of ``manifest`` the sidecar's own manifest records otherwise, as a refusal names it (everything where
    it is unreadable)."""
    try:
        earlier = json.loads((parts / MANIFEST).read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        earlier = {}
    return list(dict.fromkeys(_NAMES.get(k, k) for k, v in manifest.items() if earlier.get(k) != v))


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
    from slmembed.embedder import batching

    rows, tokens = batching(embedder, batch_size)
    return embedder.encode(texts, batch_size=rows, max_tokens=tokens)


def embed_file(embedder: Embedder, model_id: str, input_path: str | Path, output: str | Path, *,
               column: str | None = None, chunk_size: int = 4096, batch_size: int | None = None, force: bool = False,
               progress: bool = True, precision: str = "float32", calibration: np.ndarray | None = None,
               texts: int | None = None) -> dict:
    """Embed ``input_path`` into ``output`` chunk by chunk (see the module docstring); return a summary. An earlier
    output is replaced only with ``force``. Batches as ``embedder.batching`` makes them. ``texts``: what
    ``count_texts`` returned for the input, where the caller checked it before loading the model."""
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    check_output(input_path, output, force=force)
    n = texts or count_texts(input_path, column)
    if precision in quantize.CALIBRATED and calibration is None and n < 2:
        raise DataError(input_path, f"{precision} needs calibration: one text cannot set the ranges")
    if not embedder.sources:
        raise ValueError("embed_file needs an Embedder from load_embedder, which records the files of its weights")
    parts = _sidecar(output)
    manifest = {"model": model_id, "weights": weights_sha256(embedder.sources), "dtype": embedder.weights,
                "spec": embedder.spec.__dict__, "input": file_sha256(input_path), "column": column, "texts": n,
                "chunk_size": chunk_size}
    started_over, why = [], ""  # check_output: the sidecar holds only files embed writes
    if parts.is_dir():
        clean_leftovers(parts)  # writes a killed run left midway: the chunk is written again
    if (parts / MANIFEST).is_file():
        started_over = _differences(parts, manifest)
        why = f"holds chunks that differ from this run's in their {', '.join(started_over)}"
    elif parts.is_dir() and any(parts.iterdir()):  # check_output let these pass only with force
        started_over, why = ["manifest"], "holds chunks without a manifest"
    if started_over and not force:
        raise SlmembedError(f"{parts} {why}: rerun with --force to start over")
    if started_over:
        print(f"slmembed: {parts} {why}: starting over", file=sys.stderr)
        _clear(parts)
    if not (parts / MANIFEST).is_file():
        parts.mkdir(parents=True, exist_ok=True)
        write_json(parts / MANIFEST, manifest)
    names = [parts / f"{k:08d}.npy" for k in range(-(-n // chunk_size))]
    from slmembed.embedder import batching

    rows, tokens = batching(embedder, batch_size)
    bar = tqdm(total=n, desc="embed", unit="text", disable=not progress)
    reused = 0
    for name, chunk in zip(names, _chunks(input_path, column, chunk_size), strict=False):
        if name.exists():
            reused += 1
        else:
            vectors = embedder.encode(chunk, batch_size=rows, max_tokens=tokens)
            with atomic_path(name) as tmp, open(tmp, "wb") as fh:
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
    _clear(parts)
    return {"input": str(input_path), "output": str(output), "texts": n, "dim": dim, "precision": precision,
            "width": width, "chunks": len(names), "chunks_reused": reused, "started_over": started_over}


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
            chunks = _chunks(input_path, column, chunk_size)
            for block, chunk in zip(itertools.chain([first], blocks), chunks, strict=True):
                flat = pa.array(block.reshape(-1), type=kind)
                writer.write_table(pa.table({"text": chunk, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
                                            schema=schema))
