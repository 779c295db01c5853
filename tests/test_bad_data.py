"""Property-based tests: every NLI format and every STS raw format, fed malformed files.

Each generated file comes from a plan of good and defective rows (missing or extra columns, empty strings, unknown
labels, bad UTF-8, wrong delimiters, bad scores) and a file-level variant (CRLF, BOM, blank lines, very long lines,
an empty file, a wrong delimiter throughout, a missing file). The plan is the oracle: a clean file loads to exactly
the planned rows; otherwise the loader raises DataError naming the file and the line of the first defect, or, with
``skip_bad_rows``, loads the good rows and counts the others. The same failures through the ``slmembed`` command exit
with code 2, the error as the only line on stderr, and no output left behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slmembed.cli import main
from slmembed.data import sts
from slmembed.data.nli import FORMATS, detect_format, detokenize, load_triplets
from slmembed.errors import DataError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BAD_BYTES = "QQBADUTF8QQ"  # replaced by invalid UTF-8 bytes after serialisation
LONG = "long " * 30_000  # 150,000 characters, more than the csv module's default field size limit
BREAKS = re.compile(r"\r\n|\r|\n")  # line breaks as Python's universal newlines count them
GOOD = (None, "long")  # row "defects" that a loader must accept


def _text(exclude: str = "", categories: tuple[str, ...] = ("Cs",), min_size: int = 1) -> st.SearchStrategy[str]:
    chars = st.characters(blacklist_categories=categories, blacklist_characters=exclude)
    text = st.text(chars, min_size=min_size, max_size=30)
    return text.filter(str.strip) if min_size else text


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8").replace(BAD_BYTES.encode(), b"\xff\xfe"))


def _line_count(text: str) -> int:
    return len(BREAKS.findall(text))


def _assert_error(err: DataError, path: Path, line: int | None, problem: str = "") -> None:
    assert (err.path, err.line) == (str(path), line), str(err)
    assert err.problem and problem in err.problem and "\n" not in str(err) and "\r" not in str(err), str(err)


def _assert_cli_error(args: list[str], err: DataError, output: Path) -> None:
    """``slmembed ARGS`` exits 2 with the loader's error as the only line on stderr, and writes no output."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main([*args, "--device", "cpu"])
    assert (code, stderr.getvalue()) == (2, f"slmembed: error: {err}\n")
    assert not output.exists()


# --- NLI: every format that data/nli.py detects -----------------------------------------------------------------
# The columns each format is written with; id columns hold the group number, "genre" a constant.
LAYOUT: dict[str, tuple[str, ...]] = {
    "tikquuss_csv": ("pairID", "sentence1", "sentence2", "label"),
    "snli_jsonl": ("captionID", "pairID", "gold_label", "sentence1", "sentence2"),
    "snli_txt": ("gold_label", "sentence1", "sentence2", "promptID", "pairID", "genre"),
    "lingnli_jsonl": ("premise", "hypothesis", "label"),
    "new_protocols_tsv": ("index", "promptID", "pairID", "sentence1", "sentence2", "gold_label"),
    "cad_tsv": ("sentence1", "sentence2", "gold_label"),
    "ptb_tsv": ("sentence1", "sentence2", "label", "genre"),
    "triplet_csv": ("sent0", "sent1", "hard_neg"),
    "triplet_jsonl": ("anchor", "positive", "negative"),
}
ROW_DEFECTS = ("extra_column", "missing_column", "empty", "unknown_label", "bad_utf8", "wrong_delimiter",
               "not_string", "not_object", "long")


@dataclass
class NliRow:
    values: dict  # column -> value, in LAYOUT order
    label: str  # entailment, contradiction, neutral, "-", or "triplet"
    defect: str | None = None
    raw: str | None = None  # the line as written, for defects that are not a record


def _nli_row(data: st.DataObject, name: str, values: dict, label: str) -> NliRow:
    fmt = FORMATS[name]
    row = NliRow(values, label)
    kinds = [k for k in ROW_DEFECTS if not (k == "unknown_label" and fmt.triplets)
             and not (k in ("not_string", "not_object") and not fmt.jsonl)]
    row.defect = data.draw(st.sampled_from([None] * 6 + kinds), label="defect")
    # Of a "-" (no consensus) row only the label is read, so only the label can be defective.
    col = fmt.columns[2] if label == "-" else data.draw(st.sampled_from(fmt.columns), label="column")
    if row.defect == "extra_column":
        row.values["extra"] = "x"
        row.defect = None if fmt.jsonl else row.defect  # extra JSON keys are ignored
    elif row.defect == "missing_column":
        del row.values[col if fmt.jsonl else list(row.values)[-1]]
    elif row.defect == "empty":
        row.values[col] = " "
    elif row.defect == "unknown_label":
        row.values[fmt.columns[2]] = "maybe"
    elif row.defect == "bad_utf8":
        row.values[col] += BAD_BYTES
    elif row.defect == "not_string":
        row.values[col] = 7
    elif row.defect == "wrong_delimiter":
        row.raw = ";".join(f"cell{i}" for i in range(len(row.values)))
    elif row.defect == "not_object":
        row.raw = json.dumps(list(row.values.values()))
    elif row.defect == "long":
        row.values[fmt.columns[1]] = LONG  # the hypothesis (or positive): premises must match within a group
    return row


def _nli_plan(data: st.DataObject, name: str) -> list[tuple[NliRow, ...]]:
    """Groups of rows: (E, C, optional neutral and "-" rows) per premise, or one triplet row."""
    fmt = FORMATS[name]
    text = _text() if fmt.quoted or fmt.jsonl else _text("\t\r\n")
    groups = []
    for g in range(data.draw(st.integers(0, 5), label="groups")):
        premise = f"{data.draw(text, label='premise')} (group {g})"  # distinct premises: one group each
        ids = {"pairID": f"{g}x", "promptID": str(g), "captionID": f"c{g}", "index": str(g), "genre": "fiction"}
        if fmt.triplets:
            labels = ["triplet"]
        else:
            extra = data.draw(st.lists(st.sampled_from(["neutral", "-"]), max_size=2), label="extra rows")
            labels = data.draw(st.permutations(["entailment", "contradiction", *extra]), label="row order")
        rows = []
        for label in labels:
            third = data.draw(text) if fmt.triplets else label
            values = dict(zip(fmt.columns, (premise, data.draw(text, label="hypothesis"), third), strict=True))
            rows.append(_nli_row(data, name, {c: values.get(c, ids.get(c)) for c in LAYOUT[name]}, label))
        groups.append(tuple(sorted(rows, key=lambda r: r.label not in ("entailment", "contradiction", "triplet"))))
    return groups


def _render_nli(name: str, rows: list[NliRow], eol: str, bom: bool, blank_lines: bool,
                delimiter: str) -> tuple[str, int, list[int]]:
    """The file's text, the line of its first non-blank line, and the line each row starts on."""
    fmt = FORMATS[name]

    def line(cells: list[str]) -> str:
        if delimiter != fmt.delimiter or not fmt.quoted:
            return delimiter.join(cells) + eol
        buf = io.StringIO()  # "\r\n" as the terminator quotes fields holding either character
        csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerow(cells)
        return buf.getvalue()[:-2] + eol

    lead = eol * 2 if blank_lines else ""
    chunks = [lead] if fmt.jsonl else [lead, line(list(LAYOUT[name]))]
    starts = []
    for row in rows:
        starts.append(1 + sum(_line_count(c) for c in chunks))
        if row.raw is not None:
            chunks.append(row.raw + eol)
        else:
            chunks.append(json.dumps(row.values) + eol if fmt.jsonl else line([str(v) for v in row.values.values()]))
        if blank_lines:
            chunks.append(" " + eol)
    return ("\ufeff" if bom else "") + "".join(chunks), 1 + _line_count(lead), starts


def _nli_expected(name: str, groups: list[tuple[NliRow, ...]]) -> list[tuple[str, ...]]:
    """Triplets of the groups whose E and C rows (or triplet row) are good, texts stripped (and detokenised)."""
    fmt = FORMATS[name]

    def clean(value: str) -> str:
        return detokenize(value.strip()) if fmt.detok else value.strip()

    out = []
    for group in groups:
        if fmt.triplets and group[0].defect in GOOD:
            out.append(tuple(clean(group[0].values[c]) for c in fmt.columns))
        elif not fmt.triplets and group[0].defect in GOOD and group[1].defect in GOOD:
            e, c = (group[0], group[1]) if group[0].label == "entailment" else (group[1], group[0])
            out.append(tuple(clean(v) for v in (e.values[fmt.columns[0]], e.values[fmt.columns[1]],
                                                c.values[fmt.columns[1]])))
    return out


@pytest.mark.parametrize("name", sorted(FORMATS))
@SETTINGS
@given(data=st.data())
def test_nli_formats(name: str, data: st.DataObject) -> None:
    assert set(LAYOUT) == set(FORMATS)  # a new format needs a layout here
    fmt = FORMATS[name]
    groups = _nli_plan(data, name)
    rows = flat = [row for g in groups for row in g]
    if not fmt.triplets:  # NLI rows in any order; triplets follow their groups' first rows that are read
        order = data.draw(st.permutations(range(len(flat))), label="row order in the file")
        rows = [flat[i] for i in order]
        position = {id(flat[i]): pos for pos, i in enumerate(order)}
        read = [[position[id(r)] for r in g if r.defect in GOOD and r.label != "-"] for g in groups]
        ordered = sorted(zip(read, groups, strict=True), key=lambda pair: min(pair[0], default=len(flat)))
        groups = [g for _, g in ordered]
    broken = data.draw(st.sampled_from([None] * 6 + ["empty_file"] + ["wrong_delimiter"] * (not fmt.jsonl)),
                       label="broken file")
    delimiter = fmt.delimiter
    if broken == "wrong_delimiter":
        delimiter = data.draw(st.sampled_from([{",": "\t", "\t": ","}[fmt.delimiter], ";"]), label="delimiter")

    expected_error: tuple[int | None, bool] | None = None  # (line, whole file?)
    if broken == "empty_file":
        text, expected_error = data.draw(st.sampled_from(["", "\n", " \r\n\t\n", "\ufeff\n"])), (None, True)
    else:
        text, first, starts = _render_nli(name, rows, data.draw(st.sampled_from(["\n", "\r\n"]), label="eol"),
                                          data.draw(st.booleans(), label="BOM"),
                                          data.draw(st.booleans(), label="blank lines"), delimiter)
        if broken == "wrong_delimiter":
            expected_error = (first, True)
        elif fmt.jsonl and not rows:
            expected_error = (None, True)  # no line at all: an empty file
        elif fmt.jsonl and rows[0].defect in ("missing_column", "wrong_delimiter", "not_object"):
            expected_error = (first, True)  # the first JSON line decides the format
        elif bad := [n for n, row in zip(starts, rows, strict=True) if row.defect not in GOOD]:
            expected_error = (bad[0], False)

    for kind in sorted({f"row: {row.defect or 'good'}" for row in rows} | {f"file: {broken or 'intact'}"}):
        event(kind)
    event("error" if expected_error and expected_error[1] else "error; loads with skip" if expected_error else "loads")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{'.jsonl' if fmt.jsonl else '.csv'}"
        _write(path, text)
        for skip in (False, True):
            if expected_error is None or (skip and not expected_error[1]):
                assert detect_format(path) == name
                result = load_triplets([path], skip_bad_rows=skip)
                assert result.triplets == _nli_expected(name, groups) and result.duplicates == 0
                assert result.skipped_rows == sum(row.defect not in GOOD for row in rows)
                continue
            with pytest.raises(DataError) as info:
                load_triplets([path], skip_bad_rows=skip)
            _assert_error(info.value, path, expected_error[0])
            output = Path(tmp) / "run"
            _assert_cli_error(["train", "--recipe", "demo-smollm2", "--output", str(output), "--set",
                               f"data.sources=['{path}']", *(["--skip-bad-rows"] if skip else [])], info.value, output)


# --- STS: the raw formats of data/sts.py ------------------------------------------------------------------------
PLAIN = _text("\t\n\r", min_size=0)  # STS text is kept verbatim, empty strings included
SCORE = st.floats(0, 5).map(lambda x: f"{x:.3f}".rstrip("0").rstrip("."))
BAD_SCORES = st.sampled_from(["abc", "", "nan", "inf", "-inf", "NaN", "1,5"])


@dataclass
class Expect:
    """What loading should give: the pairs, or the DataError's file, line and problem text."""

    pairs: list[tuple[str, str, float]]
    error: tuple[Path, int | None, str] | None = None

    def fail(self, path: Path, line: int | None, problem: str) -> None:
        self.error = self.error or (path, line, problem)


def _check_sts(task: str, root: Path, expect: Expect) -> None:
    """load_sts gives the expected pairs (official count patched to their number) or the expected DataError."""
    event(f"error: {re.sub(r'(?<![A-Z-])[0-9]+', 'N', expect.error[2])}" if expect.error else "loads")
    with mock.patch.dict(sts.EXPECTED_COUNTS, {task: len(expect.pairs)}):
        if expect.error is None:
            got = sts.load_sts(task, root)
            assert list(zip(got.sentences1, got.sentences2, got.scores, strict=True)) == expect.pairs
            return
        with pytest.raises(DataError) as info:
            sts.load_sts(task, root)
        _assert_error(info.value, *expect.error)
        output = root / "scores.json"
        _assert_cli_error(["eval", "--model", "all-minilm-l6-v2", "--tasks", task, "--data-dir", str(root),
                           "--output", str(output)], info.value, output)


def _text_file(data: st.DataObject, path: Path, lines: list[str], expect: Expect, may_be_missing: bool) -> None:
    """Write lines (LF or CRLF ends); its first error is a missing or empty file, or its first bad UTF-8 line."""
    if may_be_missing and data.draw(st.integers(0, 9), label=f"{path.name} missing") == 0:
        expect.fail(path, None, "file not found")
        return
    eol = data.draw(st.sampled_from(["\n", "\r\n"]), label="line ends")
    _write(path, "".join(line + eol for line in lines))
    if not lines:
        expect.fail(path, None, "empty")
    bad = next((n for n, line in enumerate(lines, 1) if BAD_BYTES in line), None)
    if bad is not None:
        expect.fail(path, bad, "UTF-8")


def _sts_row(data: st.DataObject, kinds: list[str]) -> tuple[str | None, str, str, str]:
    """A defect (or None), two sentences and a score, the defect applied where it lives in the sentences or score."""
    defect = data.draw(st.sampled_from([None] * 2 * len(kinds) + kinds), label="defect")
    s1, s2 = data.draw(PLAIN, label="s1"), data.draw(PLAIN, label="s2")
    score = data.draw(BAD_SCORES if defect == "bad_score" else SCORE, label="score")
    if defect == "long":
        s2 = LONG
    elif defect == "bad_utf8":
        s1 += BAD_BYTES
    return defect, s1, s2, score


SEMEVAL = {"STS12": ("sts12", "STS"), "STS13": ("sts13", "STS"), "STS14": ("sts14", "STS"),
           "STS15": ("sts15", "STS"), "STS16": ("sts16", "STS2016"), "STS17": ("sts17", "")}


@settings(SETTINGS, max_examples=200)  # six tasks
@given(task=st.sampled_from(sorted(SEMEVAL)), data=st.data())
def test_semeval_pair_files(task: str, data: st.DataObject) -> None:
    """STS12-STS17: input (two or more tab-separated columns) and gold (a score, or blank) files, line by line."""
    folder, prefix = SEMEVAL[task]
    subsets = ["track5.en-en"] if task == "STS17" else sorted(data.draw(
        st.sets(st.sampled_from(["answers", "belief", "headlines"]), min_size=1, max_size=2), label="subsets"))
    with tempfile.TemporaryDirectory() as tmp:
        root, expect = Path(tmp), Expect([])
        for subset in subsets:  # pooled in name order
            if task == "STS17":
                inp = root / folder / "STS2017.eval.v1.1" / f"STS.input.{subset}.txt"
                gold = root / folder / "STS2017.gs" / f"STS.gs.{subset}.txt"
            else:
                inp, gold = (root / folder / f"{prefix}.{kind}.{subset}.txt" for kind in ("input", "gs"))
            in_lines, gold_lines, rows = [], [], []
            rows_in_file = 0 if data.draw(st.integers(0, 9), label="empty files") == 0 else data.draw(
                st.integers(1, 5), label="rows")
            for n in range(1, rows_in_file + 1):
                defect, s1, s2, score = _sts_row(data, ["missing_column", "wrong_delimiter", "extra_column",
                                                        "bad_score", "bad_utf8", "bad_gold_utf8", "blank_gold",
                                                        "long"])
                in_lines.append({"missing_column": s1, "wrong_delimiter": f"{s1};{s2}",
                                 "extra_column": f"{s1}\t{s2}\textra\tcolumns"}.get(defect, f"{s1}\t{s2}"))
                gold_lines.append({"blank_gold": " " * (n % 2), "bad_gold_utf8": f"3{BAD_BYTES}"}.get(
                    defect, f" {score}" if n % 2 else score))
                if defect in ("missing_column", "wrong_delimiter"):
                    rows.append((inp, n, "found 1"))
                elif defect == "bad_score" and score.strip():
                    rows.append((gold, n, "gold score"))
                elif defect not in ("bad_score", "blank_gold", "bad_utf8", "bad_gold_utf8"):
                    rows.append((s1, s2, float(score)))  # blank gold lines are unscored pairs, dropped
            _text_file(data, inp, in_lines, expect, may_be_missing=False)
            extra_gold = data.draw(st.integers(0, 7), label="extra gold line") == 0
            _text_file(data, gold, gold_lines + ["1"] * extra_gold, expect, may_be_missing=True)
            if extra_gold:
                expect.fail(gold, None, f"{len(gold_lines) + 1} gold lines but {len(in_lines)} lines")
            for row in rows:
                expect.fail(*row) if isinstance(row[0], Path) else expect.pairs.append(row)
        _check_sts(task, root, expect)


@SETTINGS
@given(data=st.data())
def test_stsb_csv(data: st.DataObject) -> None:
    """STSBenchmark: tab-separated genre, file, year, id, score, sentence 1, sentence 2 [, notes]; no header."""
    with tempfile.TemporaryDirectory() as tmp:
        root, expect = Path(tmp), Expect([])
        path = root / "stsb" / "sts-test.csv"
        lines, rows = [], []
        for n in range(1, data.draw(st.integers(0, 6), label="rows") + 1):
            defect, s1, s2, score = _sts_row(data, ["missing_column", "wrong_delimiter", "extra_column",
                                                    "bad_score", "bad_utf8", "long"])
            cells = ["main-captions", "MSRvid", "2012test", f"{n:04d}", score, s1, s2]
            cells += ["source", "notes"] if defect == "extra_column" else []
            cells = cells[:-1] if defect == "missing_column" else cells
            lines.append((";" if defect == "wrong_delimiter" else "\t").join(cells))
            if defect in ("missing_column", "wrong_delimiter"):
                rows.append((path, n, "expected at least 7"))
            elif defect == "bad_score":
                rows.append((path, n, "gold score"))
            elif defect != "bad_utf8":
                rows.append((s1, s2, float(score)))
        _text_file(data, path, lines, expect, may_be_missing=True)
        for row in rows:
            expect.fail(*row) if isinstance(row[0], Path) else expect.pairs.append(row)
        _check_sts("STSBenchmark", root, expect)


SICK_COLUMNS = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")


@SETTINGS
@given(data=st.data())
def test_sick_files(data: st.DataObject) -> None:
    """SICK-R: three tab-separated files whose header names the columns, in any order."""
    with tempfile.TemporaryDirectory() as tmp:
        root, expect = Path(tmp), Expect([])
        for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
            path = root / "sickr" / name
            header = list(data.draw(st.permutations(SICK_COLUMNS), label="header"))
            lacks = data.draw(st.sampled_from([None] * 16 + ["sentence_A", "relatedness_score"]), label="header lacks")
            header = [c for c in header if c != lacks]
            needed = max(header.index(c) for c in SICK_COLUMNS[1:4] if c in header) + 1
            lines, rows = ["\t".join(header)], []
            for n in range(2, data.draw(st.integers(0, 4), label="rows") + 2):
                defect, s1, s2, score = _sts_row(data, ["missing_column", "extra_column", "bad_score", "bad_utf8",
                                                        "long"])
                values = {"pair_ID": str(n), "sentence_A": s1, "sentence_B": s2, "relatedness_score": score,
                          "entailment_judgment": "NEUTRAL"}
                cells = [values[c] for c in header] + (["extra"] if defect == "extra_column" else [])
                cells = cells[:-1] if defect == "missing_column" else cells
                lines.append("\t".join(cells))
                if len(cells) < needed:
                    rows.append((path, n, f"expected at least {needed}"))
                elif defect == "bad_score":
                    rows.append((path, n, "gold score"))
                elif defect != "bad_utf8":
                    rows.append((s1, s2, float(score)))
            _text_file(data, path, lines, expect, may_be_missing=True)
            if lacks:
                expect.fail(path, 1, "header lacks")
            for row in rows:
                expect.fail(*row) if isinstance(row[0], Path) else expect.pairs.append(row)
        _check_sts("SICK-R", root, expect)


W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
XML_TEXT = _text("\ufffe\uffff", ("Cs", "Cc"), min_size=0)
DOCX_FATES = ("missing", "not_zip", "no_document", "bad_xml", "no_table")


def _docx(path: Path, rows: list[list[str]], fate: str | None) -> None:
    """A .docx whose document holds one table of ``rows`` (or broken as ``fate`` says)."""
    if fate == "missing":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if fate == "not_zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return
    cells = ["".join(f'<w:tc><w:p><w:r><w:t xml:space="preserve">{escape(c)}</w:t></w:r></w:p></w:tc>' for c in row)
             for row in rows]
    table = "<w:tbl>" + "".join(f"<w:tr>{c}</w:tr>" for c in cells) + "</w:tbl>"
    xml = f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{W}"><w:body>' + (
        "<w:p/>" if fate == "no_table" else table) + "</w:body></w:document>"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("word/other.xml" if fate == "no_document" else "word/document.xml",
                   xml[: len(xml) // 2] if fate == "bad_xml" else xml)


DOCX_PROBLEMS = {"missing": "file not found", "not_zip": "not a readable .docx", "no_document": "not a readable .docx",
                 "bad_xml": "not a readable .docx", "no_table": "no table"}


@SETTINGS
@given(data=st.data())
def test_biosses_docx(data: st.DataObject) -> None:
    """BIOSSES: a pairs table (number, sentence 1, sentence 2) and a scores table (number, five annotators)."""
    folder = "biosses/BIOSSES-Dataset"
    numbers = data.draw(st.permutations(range(1, data.draw(st.integers(0, 5), label="pairs") + 1)), label="order")
    pairs, scores = [["", "Sentence 1", "Sentence 2"]], [["Sentence No", *"ABCDE"]]
    pair_errors, score_errors, value_errors, expected = [], [], [], {}
    for no in numbers:
        defect = data.draw(st.sampled_from([None] * 8 + ["pair_number", "pair_cells", "score_cells", "score_text",
                                                         "missing_scores", "duplicate"]), label="defect")
        s1, s2 = data.draw(XML_TEXT, label="s1"), data.draw(XML_TEXT, label="s2")
        five = [data.draw(SCORE) for _ in range(5)]
        number = data.draw(st.sampled_from(["\u00b2", "\u0663", "x", "1.0"])) if defect == "pair_number" else str(no)
        if defect == "score_text":
            five[data.draw(st.integers(0, 4))] = data.draw(BAD_SCORES)
        pairs.append([number, s1, s2][: 2 if defect == "pair_cells" else 3])
        if defect in ("pair_number", "pair_cells"):
            pair_errors.append(f"table row {len(pairs)}:")
        if defect == "duplicate":
            pairs.append([str(no), s1, s2])
            pair_errors.append(f"table row {len(pairs)}: duplicate pair number {no}")
        if defect != "missing_scores":
            scores.append([str(no), *five][: 5 if defect == "score_cells" else 6])
        if defect == "score_cells":
            score_errors.append(f"table row {len(scores)}:")
        elif defect == "missing_scores":
            value_errors.append((0, "pair numbers differ"))
        elif defect == "score_text":
            value_errors.append((no, f"pair {no}:"))
        else:
            expected[no] = (s1.strip(), s2.strip(), sum(float(s) for s in five) / 5)
    fates = [data.draw(st.sampled_from([None] * 15 + list(DOCX_FATES)), label=f"docx {i}") for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        root, expect = Path(tmp), Expect([])
        pairs_path, scores_path = root / folder / "Annotation-Pairs.docx", root / folder / "Annotator-Scores.docx"
        for path, rows, fate, errors in ((pairs_path, pairs, fates[0], pair_errors),
                                         (scores_path, scores, fates[1], score_errors)):
            _docx(path, rows, fate)
            if fate:
                expect.fail(path, None, DOCX_PROBLEMS[fate])
            for problem in errors:
                expect.fail(path, None, problem)
        for _, problem in sorted(value_errors):
            expect.fail(scores_path, None, problem)
        expect.pairs = [expected[no] for no in sorted(expected)]
        _check_sts("BIOSSES", root, expect)
