"""The nine English STS test sets of MTEB, read from their official raw files.

Conventions (those of MTEB, so that scores are comparable with its leaderboard):

- STS12-STS16: all of a year's subsets are pooled into one set (one Spearman over 3108 / 1500 / 3750 / 3000 /
  1186 pairs). Inputs are ``STS.input.<name>.txt`` (``STS2016.input.<name>.txt`` for 2016), tab-separated, read with
  no quote processing; only the first two columns are used (STS16 has four). Gold files are aligned line by line;
  blank gold lines (unscored pairs, STS15/16) are dropped. Gold files with no input (STS13 ``SMT``, STS12 ``ALL``)
  are ignored.
- STS17: track 5, en-en (250 pairs).
- STSBenchmark: the test split (1379); ``split="dev"`` gives the 1500 dev pairs, for model selection.
- SICK-R: all three SemEval-2014 files (train + trial + test_annotated = 9927 pairs), score = relatedness_score.
- BIOSSES: the two official .docx tables, 100 pairs matched by pair number, score = mean of the 5 annotators (0-4).
  A cell's text is its runs joined, with tabs and line breaks as spaces, stripped.

Text files are kept verbatim (UTF-8, strict): only the line terminator (LF or CRLF) is removed; no whitespace
stripping, no unquoting, no normalisation (odd characters of the originals, such as U+0092 in STS15 belief, stay).
Scores are the raw gold values (0-5, 1-5 or 0-4); Spearman does not depend on the scale.
After loading, the number of pairs is checked against ``EXPECTED_COUNTS``.

Without a data directory (no ``--data-dir``, no ``$SLMEMBED_DATA``, no ``../shared/data``) the sets are taken from the
Hugging Face Hub copies that MTEB uses (``mteb/sts12-sts`` ...), which needs the ``datasets`` package and internet.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slmembed.errors import DataError, SlmembedError
from slmembed.paths import find_data_dir

TASKS: tuple[str, ...] = ("STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STSBenchmark", "BIOSSES", "SICK-R")
# The seven sets the NLI-only literature averages (SimCSE, PromCSE, PromptEOL): TASKS without STS17 and BIOSSES.
SEVEN: tuple[str, ...] = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R")
EXPECTED_COUNTS: dict[str, int] = {
    "STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
    "STS17": 250, "STSBenchmark": 1379, "BIOSSES": 100, "SICK-R": 9927,
}
STSB_DEV_COUNT = 1500

_ALIASES = {t.lower().replace("-", ""): t for t in TASKS} | {"stsb": "STSBenchmark", "sickr": "SICK-R"}
_FOLDERS = {t: t.lower().replace("-", "") for t in TASKS} | {"STSBenchmark": "stsb"}  # sts12 ... biosses, sickr
_HUB = {t: (f"mteb/{_FOLDERS[t]}-sts", None) for t in TASKS} | {
    "STSBenchmark": ("mteb/stsbenchmark-sts", None), "STS17": ("mteb/sts17-crosslingual-sts", "en-en")}
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_Cols = tuple[list[str], list[str], list[float]]  # sentences1, sentences2, scores


@dataclass(frozen=True)
class StsSet:
    """One STS evaluation set: parallel lists of sentence pairs and gold scores."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __post_init__(self) -> None:
        if not len(self.sentences1) == len(self.sentences2) == len(self.scores):
            raise ValueError(f"{self.name}: sentences1, sentences2 and scores differ in length")

    def __len__(self) -> int:
        return len(self.scores)


def canonical_task(task: str) -> str:
    """Return the canonical task name for ``task`` (case-insensitive, aliases such as "stsb" or "sickr")."""
    key = task.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _ALIASES:
        raise SlmembedError(f"unknown STS task {task!r}; valid names: {', '.join(TASKS)}")
    return _ALIASES[key]


def _lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their terminators (LF or CRLF); a final newline adds no empty line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 (byte {e.start})", line=data.count(b"\n", 0, e.start) + 1) from None
    if not text:
        raise DataError(path, "file is empty")
    lines = text.split("\n")  # not splitlines(): it would also split on U+0085, U+2028, \x1c ...
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _finite(text: str) -> float | None:
    """The number in ``text``, or None if it is not a finite number (nan and inf are not scores)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _score(path: Path, text: str, line: int) -> float:
    value = _finite(text)
    if value is None:
        raise DataError(path, f"gold score {text!r} is not a finite number", line=line)
    return value


def _columns(path: Path, line_text: str, line: int, minimum: int = 2) -> list[str]:
    cols = line_text.split("\t")
    if len(cols) < minimum:
        raise DataError(path, f"expected at least {minimum} tab-separated columns, found {len(cols)}", line=line)
    return cols


def _read_pair_files(inp: Path, gold: Path, out: _Cols) -> None:
    """Append the scored pairs of one input/gold file pair; blank gold lines are skipped."""
    in_lines, gold_lines = _lines(inp), _lines(gold)
    if len(in_lines) != len(gold_lines):
        raise DataError(gold, f"{len(gold_lines)} gold lines but {len(in_lines)} lines in {inp.name}")
    for n, (text, g) in enumerate(zip(in_lines, gold_lines, strict=True), start=1):
        cols = _columns(inp, text, n)
        if g.strip():
            out[2].append(_score(gold, g.strip(), n))
            out[0].append(cols[0])
            out[1].append(cols[1])


def _load_semeval_year(folder: Path, prefix: str) -> _Cols:
    """Pool all subsets of one SemEval year: every ``<prefix>.input.X.txt`` needs ``<prefix>.gs.X.txt``."""
    inputs = sorted(folder.glob(f"{prefix}.input.*.txt"))
    if not inputs:
        raise DataError(folder, f"no {prefix}.input.*.txt files")
    out: _Cols = ([], [], [])
    for inp in inputs:
        subset = inp.name[len(prefix) + len(".input."):-len(".txt")]
        _read_pair_files(inp, folder / f"{prefix}.gs.{subset}.txt", out)
    return out


def _load_stsb(folder: Path, split: str) -> _Cols:
    path = folder / f"sts-{split}.csv"
    out: _Cols = ([], [], [])
    for n, text in enumerate(_lines(path), start=1):
        cols = _columns(path, text, n, minimum=7)  # genre, file, year, id, score, s1, s2 [, source notes]
        out[2].append(_score(path, cols[4], n))
        out[0].append(cols[5])
        out[1].append(cols[6])
    return out


def _load_sick(folder: Path) -> _Cols:
    out: _Cols = ([], [], [])
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        path = folder / name
        lines = _lines(path)
        header = lines[0].split("\t") if lines else []
        try:
            ia, ib, isc = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
        except ValueError:
            raise DataError(path, "header lacks sentence_A, sentence_B or relatedness_score", line=1) from None
        for n, text in enumerate(lines[1:], start=2):
            cols = _columns(path, text, n, minimum=max(ia, ib, isc) + 1)
            out[2].append(_score(path, cols[isc], n))
            out[0].append(cols[ia])
            out[1].append(cols[ib])
    return out


def _cell_text(cell: ET.Element) -> str:
    """Text of a table cell: runs joined, tabs and line breaks as spaces, paragraphs joined by a space, stripped."""
    paragraphs = []
    for p in cell.iter(f"{_W}p"):
        parts = [(el.text or "") if el.tag == f"{_W}t" else " " for el in p.iter()
                 if el.tag in (f"{_W}t", f"{_W}tab", f"{_W}br", f"{_W}cr")]
        if "".join(parts).strip():
            paragraphs.append("".join(parts))
    return " ".join(paragraphs).strip()


def _docx_rows(path: Path, width: int) -> dict[int, list[str]]:
    """Rows of the first table in a .docx, keyed by the pair number in the first column (header row skipped)."""
    try:
        with zipfile.ZipFile(path) as z:
            root = ET.fromstring(z.read("word/document.xml"))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (zipfile.BadZipFile, KeyError, ET.ParseError) as e:
        raise DataError(path, f"not a readable .docx file ({e})") from None
    table = next(root.iter(f"{_W}tbl"), None)
    if table is None:
        raise DataError(path, "no table in word/document.xml")
    rows: dict[int, list[str]] = {}
    for n, tr in enumerate(table.iter(f"{_W}tr"), start=1):
        cells = [_cell_text(tc) for tc in tr.iter(f"{_W}tc")]
        if n == 1:  # header: "", "Sentence 1", "Sentence 2" / "Sentence No", "Annotator A" ...
            continue
        if len(cells) != width or not re.fullmatch("[0-9]+", cells[0]):
            raise DataError(path, f"table row {n}: expected {width} cells starting with a pair number, got {cells[:2]}")
        if int(cells[0]) in rows:
            raise DataError(path, f"table row {n}: duplicate pair number {int(cells[0])}")
        rows[int(cells[0])] = cells[1:]
    return rows


def _load_biosses(folder: Path) -> _Cols:
    pairs_path, scores_path = folder / "Annotation-Pairs.docx", folder / "Annotator-Scores.docx"
    pairs, scores = _docx_rows(pairs_path, 3), _docx_rows(scores_path, 6)
    if set(pairs) != set(scores):
        raise DataError(scores_path, f"pair numbers differ from {pairs_path.name}: {sorted(set(pairs) ^ set(scores))}")
    out: _Cols = ([], [], [])
    for no in sorted(pairs):
        out[0].append(pairs[no][0])
        out[1].append(pairs[no][1])
        values = [_finite(s) for s in scores[no]]
        if None in values:
            raise DataError(scores_path, f"pair {no}: annotator scores {scores[no]} are not all finite numbers")
        out[2].append(sum(values) / len(values))
    return out


def _load_hub(task: str, split: str) -> StsSet:
    try:
        import datasets
    except ImportError:
        raise SlmembedError(
            f"no data directory for {task}: pass --data-dir, set SLMEMBED_DATA, or `pip install datasets` "
            "to download the MTEB copy from the Hugging Face Hub"
        ) from None
    name, subset = _HUB[task]
    ds = datasets.load_dataset(name, subset, split="validation" if split == "dev" else "test")
    return StsSet(task, list(ds["sentence1"]), list(ds["sentence2"]), [float(s) for s in ds["score"]])


def load_sts(task: str, data_dir: str | Path | None = None, split: str = "test") -> StsSet:
    """Load one STS set (``split="dev"`` only for STSBenchmark); raises DataError on malformed or incomplete data."""
    task = canonical_task(task)
    if split not in ("test", "dev") or (split == "dev" and task != "STSBenchmark"):
        raise SlmembedError(f"{task} has no split {split!r}; only STSBenchmark has 'dev' (all tasks have 'test')")
    root = find_data_dir(data_dir, required=data_dir is not None)
    if root is None:
        result = _load_hub(task, split)
        folder: Path | str = _HUB[task][0]
    else:
        folder = root / _FOLDERS[task]
        if task in ("STS12", "STS13", "STS14", "STS15"):
            cols = _load_semeval_year(folder, "STS")
        elif task == "STS16":
            cols = _load_semeval_year(folder, "STS2016")
        elif task == "STS17":
            cols = ([], [], [])
            _read_pair_files(folder / "STS2017.eval.v1.1" / "STS.input.track5.en-en.txt",
                             folder / "STS2017.gs" / "STS.gs.track5.en-en.txt", cols)
        elif task == "STSBenchmark":
            cols = _load_stsb(folder, split)
        elif task == "SICK-R":
            cols = _load_sick(folder)
        else:
            cols = _load_biosses(folder / "BIOSSES-Dataset")
        result = StsSet(task, *cols)
    expected = STSB_DEV_COUNT if split == "dev" else EXPECTED_COUNTS[task]
    if len(result) != expected:
        raise DataError(folder, f"{task} {split}: expected {expected} pairs (official count), loaded {len(result)}")
    return result


def load_all(tasks: Sequence[str] | None = None, data_dir: str | Path | None = None) -> dict[str, StsSet]:
    """Load several test sets (default: all of ``TASKS``), keyed by canonical task name, in the order given."""
    names = [canonical_task(t) for t in (TASKS if tasks is None else tasks)]
    return {name: load_sts(name, data_dir) for name in dict.fromkeys(names)}
