"""SimCSE-style (anchor, positive, hard negative) triplets from NLI files.

A triplet is (premise, entailment hypothesis, contradiction hypothesis). NLI rows are grouped by
(group id, premise) inside a *source set* (one file, or the files that the data README says to combine),
and the k-th entailment of a group is paired with its k-th contradiction (``min(#E, #C)`` per group).
Neutral and ``-`` (no consensus) rows are dropped; ready-made triplet files are read as they are.

Three options get more signal from the same rows (``load_triplets``/``read_triplets`` keywords, ``DataConfig``):
``pairing="all"`` takes every (entailment, contradiction) pair of a group instead (entailment-major, first-seen
order); ``neutral_negatives=True`` adds a neutral hypothesis of the group as a 4th item, a further negative (the
group's neutrals cycled over its examples; None where it has none, as in ready-made triplets); and
``entailment_pairs=True`` adds the entailments left without a contradiction partner (with ``kth`` those beyond
``min(#E, #C)``, with ``all`` those of groups without any contradiction) as (premise, entailment, None) pairs that
only have in-batch negatives; ``TripletSet.pairs`` counts them.

Formats are detected from the header or the first JSON line (see ``FORMATS``); prefix a path with
``FORMAT:`` to override, and use ``hub:simcse`` to download SimCSE's ``nli_for_simcse.csv``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from slmembed.data.csvrows import CsvRows
from slmembed.data.jsonl import parse
from slmembed.errors import DataError, SlmembedError
from slmembed.paths import find_data_dir

Triplet = tuple[str, str, str]  # (anchor, positive, negative)
Example = tuple[str | None, ...]  # a Triplet, (anchor, positive, None), each optionally + (neutral or None,)
PAIRINGS = ("kth", "all")
Row = tuple[str, str, str, str]  # (group id, premise, hypothesis, label)

LABELS = ("entailment", "neutral", "contradiction")
NO_LABEL = "-"
SHORT_NAMES = {"nli": "nli", "lingnli": "nli_train/lingnli", "new_protocols": "nli_train/new_protocols",
               "nyu_hw2": "nli_train/nyu_dsga1011_hw2", "cad_snli": "nli_train/cad_snli"}
DEFAULT_SOURCES: tuple[str, ...] = tuple(SHORT_NAMES)
# Known folders -> their default train sets: (set name, or None for one set per file; glob patterns).
_KNOWN_DIRS: dict[str, list[tuple[str | None, tuple[str, ...]]]] = {
    "lingnli": [(None, ("**/train_round*_*.jsonl",))],  # grouped by (file, premise): 14,993
    "new_protocols": [(None, ("data/*/train.tsv",))],  # grouped by (file, promptID, premise): 11,249
    "nyu_dsga1011_hw2": [("mnli", ("mnli_*.tsv",)), ("snli", ("snli_*.tsv",))],  # 1,205 + 28
    "cad_snli": [("", ("NLI/original/train.tsv", "NLI/revised_hypothesis/train.tsv"))],  # 1,666
}
_SUFFIXES = {".csv", ".tsv", ".txt", ".jsonl", ".json"}
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"


@dataclass(frozen=True)
class Format:
    """A file format; columns are (premise, hypothesis, label), or (anchor, positive, negative) for triplets."""

    description: str
    columns: tuple[str, str, str]
    jsonl: bool = False
    delimiter: str = ","
    quoted: bool = True  # standard CSV quoting; False = QUOTE_NONE
    group: tuple[str, ...] = ()  # group-id columns, first present wins; "pairID" is used minus its last char
    triplets: bool = False
    detok: bool = False


_NLI, _PHL = ("sentence1", "sentence2", "gold_label"), ("sentence1", "sentence2", "label")
_OFFICIAL, _TAB = ("captionID", "promptID", "pairID"), "\t"
FORMATS: dict[str, Format] = {
    "tikquuss_csv": Format("CSV pairID,sentence1,sentence2,label", _PHL, group=("pairID",)),
    "snli_jsonl": Format("SNLI/MultiNLI .jsonl (gold_label, sentence1, sentence2)", _NLI, True, group=_OFFICIAL),
    "snli_txt": Format("SNLI/MultiNLI .txt (tabs: gold_label ... pairID)", _NLI, False, _TAB, False, _OFFICIAL),
    "lingnli_jsonl": Format("LingNLI .jsonl (premise, hypothesis, label)", ("premise", "hypothesis", "label"), True),
    "new_protocols_tsv": Format("New Protocols TSV (index ... gold_label)", _NLI, False, _TAB, True, ("promptID",)),
    "cad_tsv": Format("CAD-SNLI TSV (sentence1, sentence2, gold_label)", _NLI, False, _TAB),
    "ptb_tsv": Format("PTB-tokenised TSV (sentence1, sentence2, label[, genre])", _PHL, False, _TAB, False, detok=True),
    "triplet_csv": Format("triplet CSV sent0,sent1,hard_neg", ("sent0", "sent1", "hard_neg"), triplets=True),
    "triplet_jsonl": Format("triplet .jsonl (anchor, positive, negative)", ("anchor", "positive", "negative"), True,
                            triplets=True),
}
_EXPECTED = "expected one of: " + "; ".join(f.description for f in FORMATS.values())


@dataclass
class TripletSet:
    """Deduplicated triplets (examples, with the options of the module docstring) plus bookkeeping."""

    triplets: list[Example]
    counts: dict[str, int] = field(default_factory=dict)  # per source set: examples before dedup
    duplicates: int = 0  # dropped as exact duplicates across all sources
    skipped_rows: int = 0  # bad rows skipped (only when skip_bad_rows=True)
    pairs: int = 0  # examples in triplets whose negative is None (only when entailment_pairs=True)


@dataclass(frozen=True)
class _SourceSet:
    name: str
    files: tuple[Path, ...]
    fmt: str | None = None


class _BadRow(Exception):
    """A row problem: a DataError naming file and line, or a skipped row."""


_DETOK = [(re.compile(p), r) for p, r in [
    (r"-LRB-", "("), (r"-RRB-", ")"), (r"-LSB-", "["), (r"-RSB-", "]"), (r"-LCB-", "{"), (r"-RCB-", "}"),
    (r"(?i) (n't|'s|'re|'ve|'m|'ll|'d)(?!\w)", r"\1"), (r"(?i)\b(gon|wan|got) (na|ta)\b", r"\1\2"),
    (r"(?<=s) '(?=\s|$)", "'"), (r" ([.,!?;:%]+)(?=\s|$)", r"\1"), (r"([(\[{$]) ", r"\1"), (r" ([)\]}])", r"\1"),
    (r"``\s*", '"'), (r"\s*''", '"'), (r"\s{2,}", " "),
]]


def detokenize(text: str) -> str:
    """Undo PTB tokenisation with simple regexes: ``it 's ( a ) test .`` -> ``it's (a) test.``."""
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()


def _open(path: Path) -> IO[str]:
    try:
        return open(path, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc}); {_EXPECTED}") from None


def _first_line(path: Path) -> tuple[int, str]:
    """The 1-based number and text of the first non-blank line."""
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n").lstrip("\ufeff")
            if text.strip():
                return number, text
    raise DataError(path, f"file is empty; {_EXPECTED}")


def detect_format(path: str | Path) -> str:
    """Return the ``FORMATS`` name of a file's format, judged by its header or first JSON line."""
    number, line = _first_line(Path(path))
    if line.lstrip().startswith("{"):
        try:
            keys = set(parse(line))
        except ValueError:
            keys = set()
        for name in ("triplet_jsonl", "snli_jsonl", "lingnli_jsonl"):
            if set(FORMATS[name].columns) <= keys:
                return name
    else:
        cols = [c.strip() for c in line.split("\t" if "\t" in line else ",")]
        rules = [
            ("triplet_csv", {"sent0", "sent1", "hard_neg"} <= set(cols)),
            ("tikquuss_csv", cols == ["pairID", *_PHL]),
            ("new_protocols_tsv", cols[:2] == ["index", "promptID"] and cols[-1] == "gold_label"),
            ("snli_txt", {*_NLI, "pairID"} <= set(cols)),
            ("cad_tsv", cols == list(_NLI)),
            ("ptb_tsv", set(_PHL) <= set(cols)),
        ]
        for name, matches in rules:
            if matches:
                return name
    raise DataError(path, f"unknown format (first line {line[:80]!r}); {_EXPECTED}", number)


def _csv_records(path: Path, fmt: Format) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Yield (1-based line, record or problem) for each data row of a CSV/TSV file (``CsvRows``).

    The header is the first non-blank line and must name the format's columns; blank lines are skipped.
    """
    with _open(path) as f:
        rows = CsvRows(path, f, fmt.delimiter, fmt.quoted)
        missing = [repr(c) for c in fmt.columns if c not in rows.header]
        if missing:
            raise DataError(path, f"header is missing {', '.join(missing)}; expected {rows.sep}-separated columns "
                                  f"including {', '.join(fmt.columns)}", rows.line)
        yield from rows


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """Yield (1-based line, object or problem) for each non-blank line of a JSON-lines file (``jsonl.parse``)."""
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            text = raw.rstrip("\r\n").lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                obj = parse(text)
            except ValueError as exc:
                yield number, f"{exc}; expected one JSON object per line"
                continue
            yield number, obj if isinstance(obj, dict) else "expected a JSON object per line"


def _field(rec: dict, col: str, fmt: Format) -> str:
    value = rec.get(col)
    if value is None:
        raise _BadRow(f"missing {col!r}; expected {', '.join(fmt.columns)}")
    if not isinstance(value, str):
        raise _BadRow(f"{col!r} should be a string, found {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {col!r}; expected non-empty text")
    return value.strip()


def _convert(rec: dict, fmt: Format) -> Triplet | Row | None:
    """A triplet (triplet formats), a Row (NLI formats) or None for a '-' row; raises _BadRow."""
    bad = [k for k, v in rec.items() if isinstance(v, str) and _BAD_UTF8.search(v)]
    if bad:
        raise _BadRow(f"invalid UTF-8 bytes in {bad[0]!r}; expected UTF-8 text")
    if fmt.triplets:
        return tuple(_field(rec, col, fmt) for col in fmt.columns)  # type: ignore[return-value]
    s1, s2, lab = fmt.columns
    label = _field(rec, lab, fmt)
    if label == NO_LABEL:
        return None
    if label not in LABELS:
        raise _BadRow(f"unknown label {label!r} in {lab!r}; expected {', '.join(LABELS)} or {NO_LABEL}")
    premise, hypothesis = _field(rec, s1, fmt), _field(rec, s2, fmt)
    if fmt.detok:
        premise, hypothesis = detokenize(premise), detokenize(hypothesis)
    ids = [str(rec[c])[:-1] if c == "pairID" else str(rec[c]) for c in fmt.group if rec.get(c) not in (None, "")]
    return (ids[0] if ids else ""), premise, hypothesis, label


def _read_items(path: Path, fmt_name: str | None, skip: bool, skipped: list[int]) -> tuple[Format, list]:
    """Read one file into triplets or Rows; a bad row raises DataError, or is counted in skipped[0]."""
    if fmt_name is not None and fmt_name not in FORMATS:
        raise SlmembedError(f"unknown format {fmt_name!r}; known: {', '.join(FORMATS)}")
    if fmt_name:
        _first_line(path)  # an empty or unreadable file is a DataError, also with an explicit format
    fmt = FORMATS[fmt_name or detect_format(path)]
    items = []
    for line, rec in _jsonl_records(path) if fmt.jsonl else _csv_records(path, fmt):
        try:
            if isinstance(rec, str):
                raise _BadRow(rec)
            item = _convert(rec, fmt)
        except _BadRow as exc:
            if not skip:
                raise DataError(path, str(exc), line) from None
            skipped[0] += 1
            continue
        if item is not None:
            items.append(item)
    return fmt, items


def _group(rows: Iterable[Row], pairing: str = "kth", neutral_negatives: bool = False,
           entailment_pairs: bool = False) -> list[Example]:
    """Examples of each (group id, premise), in first-seen order (options: see the module docstring)."""
    if pairing not in PAIRINGS:
        raise SlmembedError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for gid, premise, hypothesis, label in rows:
        groups.setdefault((gid, premise), {name: [] for name in LABELS})[label].append(hypothesis)
    examples: list[Example] = []
    for (_, premise), hyps in groups.items():
        ents, cons, neutrals = hyps["entailment"], hyps["contradiction"], hyps["neutral"]
        if pairing == "all":
            pairs: list[tuple[str, str | None]] = [(e, c) for e in ents for c in cons]
            unpaired = [] if cons else ents
        else:
            pairs, unpaired = list(zip(ents, cons, strict=False)), ents[len(cons):]
        if entailment_pairs:
            pairs += [(e, None) for e in unpaired]
        for k, (e, c) in enumerate(pairs):
            extra = (neutrals[k % len(neutrals)] if neutrals else None,) if neutral_negatives else ()
            examples.append((premise, e, c, *extra))
    return examples


def _read_set(source: _SourceSet, skip: bool, skipped: list[int], pairing: str = "kth",
              neutral_negatives: bool = False, entailment_pairs: bool = False) -> list[Example]:
    """Examples of one source set: ready triplets as read, NLI rows grouped across all of its files."""
    ready: list[Example] = []
    rows: list[Row] = []
    for path in source.files:
        fmt, items = _read_items(path, source.fmt, skip, skipped)
        (ready if fmt.triplets else rows).extend(items)
    if neutral_negatives:
        ready = [(*t, None) for t in ready]
    return ready + _group(rows, pairing, neutral_negatives, entailment_pairs)


def read_triplets(path: str | Path, skip_bad_rows: bool = False, fmt: str | None = None, *, pairing: str = "kth",
                  neutral_negatives: bool = False, entailment_pairs: bool = False) -> list[Example]:
    """Examples from one file of any supported format (``fmt`` overrides detection); not deduplicated."""
    return _read_set(_SourceSet(str(path), (Path(path),), fmt), skip_bad_rows, [0], pairing, neutral_negatives,
                     entailment_pairs)


def _known_sets(folder: Path) -> list[_SourceSet]:
    """The train sets of a known folder, grouped as its README says."""
    sets = []
    for name, patterns in _KNOWN_DIRS[folder.name]:
        files = []
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            if not found:
                raise DataError(folder, f"no files matching {pattern!r}")
            files += found
        if name is None:
            sets += [_SourceSet(p.relative_to(folder.parent).as_posix(), (p,)) for p in files]
        else:
            sets.append(_SourceSet(f"{folder.name}/{name}" if name else folder.name, tuple(files)))
    return sets


def _dir_sets(folder: Path, root: Path | None = None) -> list[_SourceSet]:
    """Known folders give their train sets; other folders every detectable file below them, one set each."""
    if folder.name in _KNOWN_DIRS:
        return _known_sets(folder)
    sets: list[_SourceSet] = []
    root = root or folder.parent  # set names are paths relative to the parent of the folder given
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            sets += _dir_sets(child, root)
        elif child.suffix.lower() in _SUFFIXES:
            try:
                detect_format(child)
            except DataError:
                continue
            sets.append(_SourceSet(child.relative_to(root).as_posix(), (child,)))
    return sets


def _hub_file(name: str) -> Path:
    """Download SimCSE's nli_for_simcse.csv (275,601 triplets) through huggingface_hub."""
    if name != "simcse":
        raise SlmembedError(f"unknown hub source 'hub:{name}'; known: hub:simcse")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SlmembedError("source 'hub:simcse' needs huggingface_hub: pip install 'slmembed[hub]'") from None
    try:
        return Path(hf_hub_download("princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv", repo_type="dataset"))
    except Exception as exc:  # offline, auth, missing file: all user-facing
        raise SlmembedError(f"cannot download nli_for_simcse.csv: {exc}") from exc


def _expand(source: str | Path, data_dir: str | Path | None) -> list[_SourceSet]:
    """One ``sources`` entry (short name, 'all', hub:simcse, FORMAT:path, file or folder) as source sets."""
    fmt = None
    if isinstance(source, str):
        if source == "all":
            return [s for name in DEFAULT_SOURCES for s in _expand(name, data_dir)]
        if source in SHORT_NAMES:
            folder = find_data_dir(data_dir) / SHORT_NAMES[source]
            if not folder.is_dir():
                raise DataError(folder, f"folder for source {source!r} not found")
            return _dir_sets(folder)
        if source.startswith("hub:"):
            return [_SourceSet(source, (_hub_file(source[4:]),), "triplet_csv")]
        prefix, sep, rest = source.partition(":")
        if sep and prefix in FORMATS:
            fmt, source = prefix, rest
    path = Path(source).expanduser()
    if not path.exists() and not path.is_absolute():  # also look relative to the data directory
        root = find_data_dir(data_dir, required=False)
        path = root / path if root is not None and (root / path).exists() else path
    if not path.exists():
        raise DataError(path, f"no such file or folder; a source is a file, a folder, {', '.join(SHORT_NAMES)}, "
                              "all, hub:simcse or FORMAT:path")
    if path.is_dir() and fmt is None:
        return _dir_sets(path)
    return [_SourceSet(str(source), (path,), fmt)]


def load_triplets(sources: Sequence[str | Path] | None = None, data_dir: str | Path | None = None,
                  skip_bad_rows: bool = False, *, pairing: str = "kth", neutral_negatives: bool = False,
                  entailment_pairs: bool = False) -> TripletSet:
    """Load, group and deduplicate (first seen kept, on the whole tuple) examples from ``sources``, by default
    ``DEFAULT_SOURCES``; the keyword options are those of the module docstring."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sets = [s for source in (DEFAULT_SOURCES if sources is None else sources) for s in _expand(source, data_dir)]
    result, seen, skipped = TripletSet([]), set(), [0]
    for source_set in sets:
        triplets = _read_set(source_set, skip_bad_rows, skipped, pairing, neutral_negatives, entailment_pairs)
        result.counts[source_set.name] = result.counts.get(source_set.name, 0) + len(triplets)
        for triplet in triplets:
            if triplet in seen:
                result.duplicates += 1
            else:
                seen.add(triplet)
                result.triplets.append(triplet)
    result.skipped_rows = skipped[0]
    result.pairs = sum(t[2] is None for t in result.triplets)
    return result
