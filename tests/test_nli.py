"""Tests for slmembed.data.nli: triplet counts on the real data, every format, and error reporting."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from slmembed.data.nli import DEFAULT_SOURCES, FORMATS, detect_format, detokenize, load_triplets, read_triplets
from slmembed.errors import DataError, SlmembedError
from slmembed.paths import find_data_dir

DATA = find_data_dir(required=False)
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "nli_train").is_dir(), reason="no shared data directory")

# k-th entailment paired with k-th contradiction per (pairID minus last char, premise). SOURCES.md's column
# "premises with both" counts distinct premises; some premises have 2 E + 2 C, so triplets >= premises.
NLI_TRIPLETS = {"snli_1.0_dev.csv": 2954, "snli_1.0_test.csv": 2929,
                "multinli_1.0_dev_matched.csv": 2933, "multinli_1.0_dev_mismatched.csv": 2993}
NLI_PREMISES_WITH_BOTH = {"snli_1.0_dev.csv": 2943, "snli_1.0_test.csv": 2921,
                          "multinli_1.0_dev_matched.csv": 2932, "multinli_1.0_dev_mismatched.csv": 2993}


@pytest.fixture(scope="module")
def everything():
    return load_triplets()


def _total(counts: dict[str, int], prefix: str) -> int:
    return sum(n for name, n in counts.items() if name.startswith(prefix))


# --- real data -----------------------------------------------------------------------------------------------
@needs_data
def test_default_sources_counts(everything):
    c = everything.counts
    assert DEFAULT_SOURCES == ("nli", "lingnli", "new_protocols", "nyu_hw2", "cad_snli")
    assert {k: v for k, v in c.items() if k.startswith("nli/")} == {f"nli/{k}": v for k, v in NLI_TRIPLETS.items()}
    assert _total(c, "nli/") == 11809
    assert _total(c, "lingnli/") == 14993 and len([k for k in c if k.startswith("lingnli/")]) == 15
    assert all("/train_round" in k for k in c if k.startswith("lingnli/"))  # val files are not used
    assert {k: v for k, v in c.items() if k.startswith("new_protocols/")} == {
        "new_protocols/data/base/train.tsv": 2449, "new_protocols/data/contrast/train.tsv": 4090,
        "new_protocols/data/edit_other/train.tsv": 2311, "new_protocols/data/edit_premise/train.tsv": 2399}
    assert c["nyu_dsga1011_hw2/mnli"] == 1205 and c["nyu_dsga1011_hw2/snli"] == 28
    assert c["cad_snli"] == 1666
    assert sum(c.values()) == 11809 + 29141 == 40950
    assert len(everything.triplets) == len(set(everything.triplets)) == 40950 - everything.duplicates
    # All duplicates are HW2 triplets equal to fallback ones (680 with this detokeniser): contrary to the README,
    # HW2's mnli_val/snli_val files are samples of MultiNLI dev-matched / SNLI dev, i.e. of the nli/ fallback files.
    hw2, fallback = set(load_triplets(["nyu_hw2"]).triplets), set(everything.triplets[:11809])
    assert everything.duplicates == len(hw2 & fallback) > 600
    assert everything.skipped_rows == 0


@needs_data
@pytest.mark.parametrize("name", sorted(NLI_TRIPLETS))
def test_nli_files_match_sources_md(name):
    triplets = read_triplets(DATA / "nli" / name)
    assert len(triplets) == NLI_TRIPLETS[name]
    assert len({t[0] for t in triplets}) == NLI_PREMISES_WITH_BOTH[name]  # SOURCES.md "premises with both"


@needs_data
def test_hw2_per_file_counts_match_readme():
    folder = DATA / "nli_train" / "nyu_dsga1011_hw2"
    files = ("mnli_train.tsv", "mnli_val.tsv", "snli_val.tsv")
    assert [len(read_triplets(folder / f)) for f in files] == [379, 825, 28]


@needs_data
def test_folder_and_relative_sources_equal_short_names():
    by_folder = load_triplets([DATA / "nli_train" / "cad_snli", "nli_train/nyu_dsga1011_hw2"])
    by_name = load_triplets(["cad_snli", "nyu_hw2"])
    assert by_folder.counts == by_name.counts and by_folder.triplets == by_name.triplets
    assert load_triplets(["cad_snli"]).triplets == by_name.triplets[:1666]  # deterministic order


@needs_data
def test_known_groups_never_use_neutral(everything):
    triplets = set(everything.triplets)
    assert ("Two women are embracing while holding to go packages.", "Two woman are holding packages.",
            "The men are fighting outside a deli.") in triplets
    assert ("The new rights are nice enough", "The latest privileges are adequate",  # trailing spaces stripped
            "In all honesty, the rights recently put in place are nowhere near enough") in triplets
    graves = [t for t in everything.triplets if t[0] == "Graves hid out in the deep woods."]
    assert ("Graves hid out in the deep woods.", "The graves are in the deep woods.",
            "The graves are not hidden at all.") in graves and len(graves) == 3  # one per LingNLI protocol
    assert ("A man is riding a red motorcycle with a small child sitting in front of him.",
            "A man rides his motorcycle with a child.", "A man rides his car with his son.") in triplets
    for name in NLI_TRIPLETS:  # no triplet uses a hypothesis labelled neutral for its own premise
        neutral: dict[str, set[str]] = {}
        with open(DATA / "nli" / name, encoding="utf-8", newline="") as f:
            for r in csv.DictReader(f):
                if r["label"] == "neutral":
                    neutral.setdefault(r["sentence1"].strip(), set()).add(r["sentence2"].strip())
        for premise, positive, negative in read_triplets(DATA / "nli" / name):
            assert positive not in neutral.get(premise, ()) and negative not in neutral.get(premise, ())
    assert "The sisters are hugging goodbye while holding to go packages after just eating lunch." not in {
        h for t in triplets for h in t[1:]}


def test_detokenize_examples():
    assert detokenize("it 's raining , is n't it ?") == "it's raining, isn't it?"
    assert detokenize("I ca n't and wo n't go .") == "I can't and won't go."
    assert detokenize("`` Maybe , '' he said slowly .") == '"Maybe," he said slowly.'
    assert detokenize("assets -LRB- see figure 1.2 -RRB- .") == "assets (see figure 1.2)."
    assert detokenize("( and loud ) people 're gon na pay $ 5 !") == "(and loud) people're gonna pay $5!"
    assert detokenize("households ' assets ; Jamaica 's tip : 5 %") == "households' assets; Jamaica's tip: 5%"
    assert detokenize("( see the theory , above . )") == "(see the theory, above.)"


@needs_data
def test_hw2_text_is_detokenised():
    hw2 = load_triplets(["nyu_hw2"]).triplets
    assert not any(" 's " in s or " n't" in s or " ." in s[-3:] or "``" in s for t in hw2 for s in t)


# --- formats in tmp_path -------------------------------------------------------------------------------------
def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_official_snli_jsonl(tmp_path):
    def row(label, s2, pid, cap="1.jpg#0", s1="A dog runs."):
        return {"annotator_labels": [label], "captionID": cap, "gold_label": label, "pairID": pid,
                "sentence1": s1, "sentence2": s2, "sentence1_parse": "(ROOT)"}
    path = _jsonl(tmp_path / "snli_1.0_train.jsonl", [
        row("neutral", "The dog is happy.", "1.jpg#0r1n"), row("entailment", "An animal moves.", "1.jpg#0r1e"),
        row("contradiction", "A cat sleeps.", "1.jpg#0r1c"), row("-", "No consensus.", "1.jpg#0r2e"),
        row("entailment", "A man walks.", "2.jpg#0r1e", "2.jpg#0", "A man is outside."),
        row("neutral", "He is late.", "2.jpg#0r1n", "2.jpg#0", "A man is outside.")])
    assert detect_format(path) == "snli_jsonl"
    assert read_triplets(path) == [("A dog runs.", "An animal moves.", "A cat sleeps.")]


def test_multinli_txt_with_crlf_and_stray_quote(tmp_path):
    header = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
              "sentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1")
    said = 'He said "hi.'  # an unbalanced quote: the official .txt files are not quoted
    rows = [("entailment", said, "He spoke.", "7", "7e"), ("contradiction", said, "He was mute.", "7", "7c"),
            ("neutral", said, "He was glad.", "7", "7n"), ("contradiction", "Other.", "No.", "8", "8c")]
    lines = [header] + [f"{g}\t( x )\t( y )\t(ROOT)\t(ROOT)\t{s1}\t{s2}\t{p}\t{pid}\tfiction\t{g}"
                        for g, s1, s2, p, pid in rows]
    path = _write(tmp_path / "multinli_1.0_train.txt", "\r\n".join(lines) + "\r\n")
    assert detect_format(path) == "snli_txt"
    assert read_triplets(path) == [(said, "He spoke.", "He was mute.")]


def test_ready_triplet_files(tmp_path):
    csv_path = _write(tmp_path / "nli_for_simcse.csv", 'sent0,sent1,hard_neg\n"A, B.",A.,Not A.\nX.,Y.,Z.\n')
    assert detect_format(csv_path) == "triplet_csv"
    assert read_triplets(csv_path) == [("A, B.", "A.", "Not A."), ("X.", "Y.", "Z.")]
    jsonl_path = _jsonl(tmp_path / "t.jsonl", [{"anchor": "a", "positive": "p", "negative": "n", "extra": 1}])
    assert read_triplets(jsonl_path) == [("a", "p", "n")]
    result = load_triplets([csv_path, jsonl_path, csv_path])
    assert result.triplets == [("A, B.", "A.", "Not A."), ("X.", "Y.", "Z."), ("a", "p", "n")]
    assert result.duplicates == 2 and result.counts == {str(csv_path): 4, str(jsonl_path): 1}


def test_format_override_and_folder(tmp_path):
    body = ("sentence1\tsentence2\tlabel\n"
            "it 's red .\tit 's a colour .\tentailment\nit 's red .\tit 's blue .\tcontradiction\n")
    path = _write(tmp_path / "data.dat", body)
    expected = [("it's red.", "it's a colour.", "it's blue.")]
    assert read_triplets(path, fmt="ptb_tsv") == expected
    assert load_triplets([f"ptb_tsv:{path}"]).triplets == expected
    with pytest.raises(DataError, match="missing 'gold_label'"):  # a wrong override is reported, not guessed
        load_triplets([f"cad_tsv:{path}"])
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "x.tsv", body)
    _write(tmp_path / "README.txt", "just notes\n")
    assert load_triplets([tmp_path]).counts == {f"{tmp_path.name}/sub/x.tsv": 1}
    with pytest.raises(SlmembedError, match="unknown format"):
        read_triplets(path, fmt="nope")
    with pytest.raises(SlmembedError, match="hub:simcse"):
        load_triplets(["hub:other"])
    with pytest.raises(DataError, match="no such file or folder; a source is a file, a folder, nli, lingnli"):
        load_triplets([tmp_path / "nope", "lingnli"])
    assert load_triplets([]).triplets == []
    assert set(FORMATS) >= {"tikquuss_csv", "snli_jsonl", "snli_txt", "triplet_csv", "triplet_jsonl"}


# --- errors --------------------------------------------------------------------------------------------------
TIK = "pairID,sentence1,sentence2,label\n"


def _error(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_triplets(path, **kwargs)
    assert info.value.path == str(path)
    return info.value


def test_bad_label_names_file_and_line(tmp_path):
    path = _write(tmp_path / "a.csv", TIK + "1e,P.,H.,entailment\n1c,P.,H2.,maybe\n")
    err = _error(path)
    assert err.line == 3 and str(err).startswith(f"{path}:3: unknown label 'maybe'") and "contradiction" in str(err)


def test_line_numbers_count_multiline_fields(tmp_path):
    path = _write(tmp_path / "a.csv", TIK + '1e,"P\nstill P.",H.,entailment\n1c,P.,H2.,contradiction\n1n,P.,H3.,bad\n')
    assert _error(path).line == 5


def test_missing_column(tmp_path):
    err = _error(_write(tmp_path / "a.csv", TIK + "1e,P.,entailment\n"))
    assert err.line == 2 and "expected 4 comma-separated columns" in err.problem and "got 3" in err.problem
    err = _error(_jsonl(tmp_path / "b.jsonl", [{"premise": "P", "hypothesis": "H", "label": "neutral"},
                                               {"premise": "P", "label": "entailment"}]))
    assert err.line == 2 and "missing 'hypothesis'" in err.problem


def test_bad_utf8_bytes(tmp_path):
    path = _write(tmp_path / "a.tsv", b"sentence1\tsentence2\tgold_label\nP.\tH.\tentailment\nP.\tH2.\tneutral\n"
                                      b"P.\tbad \xff\xfe bytes\tcontradiction\n")
    err = _error(path)
    assert err.line == 4 and "invalid UTF-8" in err.problem


def test_jsonl_lone_surrogates_and_deep_nesting_are_bad_rows(tmp_path):
    """Valid JSON that no tokenizer can read (a lone surrogate escape) and JSON nested past Python's parser are rows
    named by line (or skipped), like invalid JSON; a deep first line is an unknown format."""
    good = '{"anchor": "a", "positive": "p", "negative": "n"}\n'
    surrogate = _write(tmp_path / "a.jsonl", good + '{"anchor": "a", "positive": "p\\udc00", "negative": "n"}\n')
    err = _error(surrogate)
    assert err.line == 2 and err.problem.startswith("a string holds a lone surrogate ('\\udc00')")
    deep = _write(tmp_path / "b.jsonl", good + "[" * 100_000 + "\n")
    err = _error(deep)
    assert err.line == 2 and err.problem.startswith("JSON nested too deeply")
    for path in (surrogate, deep):
        assert load_triplets([path], skip_bad_rows=True).skipped_rows == 1
    err = _error(_write(tmp_path / "c.jsonl", '{"a": ' * 100_000 + "\n"))
    assert err.line == 1 and "unknown format" in err.problem


def test_empty_text_empty_file_unknown_format_missing_file(tmp_path):
    err = _error(_write(tmp_path / "a.csv", TIK + "1e,P.,   ,entailment\n"))
    assert err.line == 2 and "empty 'sentence2'" in err.problem
    for content in ("", "\n  \n"):
        err = _error(_write(tmp_path / "empty.csv", content))
        assert err.line is None and "empty" in err.problem and "expected one of" in err.problem
    err = _error(_write(tmp_path / "odd.csv", "foo,bar\n1,2\n"))
    assert "unknown format" in err.problem and "sent0,sent1,hard_neg" in err.problem
    assert "cannot read" in _error(tmp_path / "missing.csv").problem
    assert _error(_write(tmp_path / "c.jsonl", '{"anchor": "a", "positive": "p", "negative": "n"}\n{oops\n')).line == 2


def test_skip_bad_rows_counts(tmp_path):
    rows = "1e,P.,H.,entailment\n1c,P.,H2.,maybe\n1x,P.\n1c,P.,H3.,contradiction\n2e,Q.,,entailment\n3-,R.,S.,-\n"
    path = _write(tmp_path / "a.csv", TIK + rows)
    with pytest.raises(DataError):
        load_triplets([path])
    result = load_triplets([path], skip_bad_rows=True)
    assert result.skipped_rows == 3 and result.triplets == [("P.", "H.", "H3.")]


# --- pairing="all", neutral_negatives, entailment_pairs ---------------------------------------------------------
def _label_counts(files: list[Path], quoting: int) -> dict[str, Counter]:
    """Per premise (the group key of these id-less TSVs), how many hypotheses of each label; plain csv, no grouping
    code of slmembed (the unquoted HW2 files are PTB-tokenised: their premises are detokenised as the loader does)."""
    groups: dict[str, Counter] = {}
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            for r in csv.DictReader(f, delimiter="\t", quoting=quoting):
                premise = r["sentence1"].strip()
                premise = detokenize(premise) if quoting == csv.QUOTE_NONE else premise
                groups.setdefault(premise, Counter())[r.get("gold_label") or r["label"]] += 1
    return groups


@needs_data
@pytest.mark.parametrize("source, sets", [
    ("cad_snli", {"cad_snli": (["NLI/original/train.tsv", "NLI/revised_hypothesis/train.tsv"], csv.QUOTE_MINIMAL)}),
    ("nyu_hw2", {"nyu_dsga1011_hw2/mnli": (["mnli_train.tsv", "mnli_val.tsv"], csv.QUOTE_NONE),
                 "nyu_dsga1011_hw2/snli": (["snli_val.tsv"], csv.QUOTE_NONE)})])
def test_option_counts_match_plain_python(source, sets):
    folder = DATA / "nli_train" / ("cad_snli" if source == "cad_snli" else "nyu_dsga1011_hw2")
    groups = {name: _label_counts([folder / f for f in files], quoting) for name, (files, quoting) in sets.items()}

    def expected(per_group):
        return {name: sum(per_group(g["entailment"], g["contradiction"], g["neutral"]) for g in gs.values())
                for name, gs in groups.items()}
    assert load_triplets([source]).counts == expected(lambda e, c, n: min(e, c))
    assert load_triplets([source], pairing="all").counts == expected(lambda e, c, n: e * c)
    assert load_triplets([source], entailment_pairs=True).counts == expected(lambda e, c, n: e)  # each E once
    assert load_triplets([source], pairing="all", entailment_pairs=True).counts == expected(
        lambda e, c, n: e * c if c else e)
    assert sum(expected(lambda e, c, n: e * c).values()) > sum(expected(lambda e, c, n: min(e, c)).values())
    result = load_triplets([source], pairing="all", neutral_negatives=True, entailment_pairs=True)
    assert result.counts == expected(lambda e, c, n: e * c if c else e)
    neutral = {premise: g["neutral"] > 0 for gs in groups.values() for premise, g in gs.items()}
    assert all(len(t) == 4 and (t[3] is not None) == neutral[t[0]] for t in result.triplets)


@needs_data
def test_entailment_pairs_match_readme():
    # README: about 9,100 entailment pairs without a contradiction partner, 7,591 in HW2 and 1,496 in New Protocols.
    plain = load_triplets(["nyu_hw2", "new_protocols"])
    extra = load_triplets(["nyu_hw2", "new_protocols"], entailment_pairs=True)
    assert sum(extra.counts.values()) - sum(plain.counts.values()) == 7591 + 1496
    assert extra.pairs == 7591 + 1496 and [t for t in extra.triplets if t[2] is not None] == plain.triplets
    assert load_triplets(["nyu_hw2", "new_protocols"], pairing="all", entailment_pairs=True).pairs == 7538 + 1496


@needs_data
def test_all_options_on_default_sources():
    result = load_triplets(pairing="all", neutral_negatives=True, entailment_pairs=True)
    assert sum(result.counts.values()) == 52189 and len(result.triplets) == 51637
    assert result.pairs == sum(t[2] is None for t in result.triplets) == 9769
    assert sum(t[3] is not None for t in result.triplets) == 35651 and {len(t) for t in result.triplets} == {4}
    new_protocols = {k: v for k, v in result.counts.items() if k.startswith("new_protocols/")}
    assert new_protocols["new_protocols/data/contrast/train.tsv"] == 4241  # README: 4241 E, each in one example
    contrast = read_triplets(DATA / "nli_train/new_protocols/data/contrast/train.tsv", neutral_negatives=True)
    assert len(contrast) == 4090 and {t[3] for t in contrast} == {None}  # contrast has no neutral class


GROUPS = [("P1", "E1", "entailment"), ("P1", "C1", "contradiction"), ("P1", "N1", "neutral"),
          ("P4", "N4", "neutral"), ("P1", "E2", "entailment"), ("P2", "E4", "entailment"),
          ("P1", "C2", "contradiction"), ("P3", "E5", "entailment"), ("P1", "E3", "entailment"),
          ("P2", "N3", "neutral"), ("P1", "N2", "neutral"), ("P3", "C3", "contradiction"),
          ("P4", "C4", "contradiction"), ("P1", "-1", "-")]
ALL_P1 = [("P1", e, c) for e in ("E1", "E2", "E3") for c in ("C1", "C2")]


@pytest.fixture
def groups_file(tmp_path) -> Path:
    """P1: 3 E, 2 C, 2 N; P2: E and N, no C; P3: E and C, no N; P4: N and C, no E (cad_tsv, grouped by premise)."""
    return _write(tmp_path / "g.tsv", "sentence1\tsentence2\tgold_label\n" + "".join(f"{p}\t{h}\t{lab}\n"
                                                                                   for p, h, lab in GROUPS))


def test_pairing_options_by_hand(groups_file):
    kth = [("P1", "E1", "C1"), ("P1", "E2", "C2"), ("P3", "E5", "C3")]
    assert read_triplets(groups_file) == kth == read_triplets(groups_file, pairing="kth", neutral_negatives=False,
                                                              entailment_pairs=False)  # defaults unchanged
    assert read_triplets(groups_file, pairing="all") == ALL_P1 + [("P3", "E5", "C3")]  # entailment-major
    assert read_triplets(groups_file, entailment_pairs=True) == [*kth[:2], ("P1", "E3", None), ("P2", "E4", None),
                                                                 kth[2]]
    assert read_triplets(groups_file, pairing="all", entailment_pairs=True) == [*ALL_P1, ("P2", "E4", None),
                                                                                ("P3", "E5", "C3")]
    assert read_triplets(groups_file, neutral_negatives=True) == [("P1", "E1", "C1", "N1"), ("P1", "E2", "C2", "N2"),
                                                                  ("P3", "E5", "C3", None)]
    assert read_triplets(groups_file, pairing="all", neutral_negatives=True, entailment_pairs=True) == [
        *[(*t, n) for t, n in zip(ALL_P1, ["N1", "N2"] * 3, strict=True)], ("P2", "E4", None, "N3"),
        ("P3", "E5", "C3", None)]
    assert read_triplets(groups_file, neutral_negatives=True, entailment_pairs=True)[:3] == [
        ("P1", "E1", "C1", "N1"), ("P1", "E2", "C2", "N2"), ("P1", "E3", None, "N1")]  # neutrals cycle over pairs too
    with pytest.raises(SlmembedError, match="unknown pairing 'every'"):
        read_triplets(groups_file, pairing="every")


def test_options_in_load_triplets(groups_file, tmp_path):
    other = _write(tmp_path / "h.tsv", "sentence1\tsentence2\tgold_label\nP3\tE5\tentailment\n"
                                       "P3\tC3\tcontradiction\nP3\tN5\tneutral\nP2\tE4\tentailment\n")
    ready = _write(tmp_path / "t.csv", "sent0,sent1,hard_neg\nA.,P.,N.\n")
    plain = load_triplets([groups_file, other, ready])
    assert plain.triplets == [("P1", "E1", "C1"), ("P1", "E2", "C2"), ("P3", "E5", "C3"), ("A.", "P.", "N.")]
    assert plain.duplicates == 1 and plain.pairs == 0
    result = load_triplets([groups_file, other, ready], neutral_negatives=True, entailment_pairs=True)
    assert result.triplets == [  # dedup on the whole tuple: P3's triplet comes back with h.tsv's neutral
        ("P1", "E1", "C1", "N1"), ("P1", "E2", "C2", "N2"), ("P1", "E3", None, "N1"), ("P2", "E4", None, "N3"),
        ("P3", "E5", "C3", None), ("P3", "E5", "C3", "N5"), ("P2", "E4", None, None), ("A.", "P.", "N.", None)]
    assert result.pairs == 3 and result.duplicates == 0
    pairs_only = load_triplets([groups_file, other], entailment_pairs=True)  # h.tsv adds nothing new
    assert pairs_only.duplicates == 2 and pairs_only.pairs == 2 and len(pairs_only.triplets) == 5
    assert result.counts == {str(groups_file): 5, str(other): 2, str(ready): 1}
    assert load_triplets([ready], pairing="all", entailment_pairs=True).triplets == [("A.", "P.", "N.")]
