"""STS loaders: official counts, spot checks against the raw files, and DataError messages on broken copies."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from slmembed.data import sts
from slmembed.data.sts import EXPECTED_COUNTS, TASKS, StsSet, canonical_task, load_all, load_sts
from slmembed.errors import DataError, SlmembedError
from slmembed.paths import find_data_dir


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return find_data_dir()  # the real data (../shared/data or $SLMEMBED_DATA); raises if absent


@pytest.fixture(scope="module")
def all_sets(data_dir: Path) -> dict[str, StsSet]:
    return load_all(data_dir=data_dir)


def test_counts_are_official(all_sets: dict[str, StsSet], data_dir: Path) -> None:
    assert list(all_sets) == list(TASKS)
    assert {k: len(v) for k, v in all_sets.items()} == EXPECTED_COUNTS == {
        "STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
        "STS17": 250, "STSBenchmark": 1379, "BIOSSES": 100, "SICK-R": 9927,
    }
    assert len(load_sts("STSBenchmark", data_dir, split="dev")) == 1500


def test_text_is_clean(all_sets: dict[str, StsSet]) -> None:
    for s in all_sets.values():
        assert all(isinstance(x, float) for x in s.scores)
        for text in s.sentences1 + s.sentences2:
            assert text.strip() and "\t" not in text and "\r" not in text and "\n" not in text, (s.name, text)


def test_sts12_first_and_last_pair(all_sets: dict[str, StsSet]) -> None:
    s = all_sets["STS12"]  # subsets pooled in name order: MSRpar first, surprise.SMTnews last
    assert s.sentences1[0] == (
        "The problem likely will mean corrective changes before the shuttle fleet starts flying again.")
    assert s.sentences2[0].startswith("He said the problem needs to be corrected before the space shuttle fleet")
    assert s.scores[0] == 4.4
    assert (s.sentences1[-1], s.sentences2[-1], s.scores[-1]) == (
        "He did, but the initiative did not get very far.",
        "What it did without the initiative not going very far.", 3.5)


def test_sts16_uses_first_two_columns_only(all_sets: dict[str, StsSet], data_dir: Path) -> None:
    s = all_sets["STS16"]
    raw = (data_dir / "sts16" / "STS2016.input.answer-answer.txt").read_text("utf-8").split("\n")[8].split("\t")
    assert len(raw) == 4  # line 9 is the first scored answer-answer pair (gold line 9 = "3")
    assert (s.sentences1[0], s.sentences2[0], s.scores[0]) == (raw[0], raw[1], 3.0)
    assert s.sentences2[0].endswith("herding the cats every two hours. ")  # trailing space kept verbatim
    assert not any("StackExchange Network" in t for t in s.sentences1 + s.sentences2)


def test_sts17_stsb_sickr_spot_checks(all_sets: dict[str, StsSet]) -> None:
    s = all_sets["STS17"]
    assert (s.sentences1[0], s.sentences2[0], s.scores[0]) == (
        "A person is on a baseball team.", "A person is playing basketball on a team.", 2.4)
    b = all_sets["STSBenchmark"]
    assert (b.sentences1[0], b.sentences2[0], b.scores[0]) == (
        "A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    assert (b.sentences1[-1], b.sentences2[-1], b.scores[-1]) == (  # a 9-column row: extra source columns ignored
        "South Korea declares end to MERS outbreak", "North Korea Delegation Meets With South Korean Officials", 0.0)
    k = all_sets["SICK-R"]  # train first ... test_annotated (CRLF) last
    assert k.sentences1[0] == "A group of kids is playing in a yard and an old man is standing in the background"
    assert k.scores[0] == 4.5
    assert (k.sentences1[-1], k.sentences2[-1], k.scores[-1]) == (
        "A man is in a parking lot and is playing tennis against a large wall",
        "The snowboarder is leaping fearlessly over white snow", 1.0)


def test_biosses_mean_of_five_annotators(all_sets: dict[str, StsSet]) -> None:
    s = all_sets["BIOSSES"]
    # Read by hand from Annotator-Scores.docx: pair 99 = 3,3,4,3,3; pair 100 = 2,2,1,2,2; pair 1 = 4,4,4,4,4.
    assert s.scores[98] == pytest.approx((3 + 3 + 4 + 3 + 3) / 5) == pytest.approx(3.2)
    assert s.scores[99] == pytest.approx((2 + 2 + 1 + 2 + 2) / 5) == pytest.approx(1.8)
    assert s.scores[0] == 4.0
    assert s.sentences1[99] == "Oncogenic KRAS mutations are common in cancer."
    assert s.sentences1[0].startswith("It has recently been shown that Craf is essential for Kras G12D-induced NSCLC")
    assert all(0.0 <= x <= 4.0 for x in s.scores)


@pytest.mark.parametrize("alias, name", [("sts12", "STS12"), ("stsb", "STSBenchmark"), ("STS-B", "STSBenchmark"),
                                          ("sickr", "SICK-R"), ("sick-r", "SICK-R"), ("Sick_R", "SICK-R"),
                                          ("biosses", "BIOSSES"), ("stsbenchmark", "STSBenchmark")])
def test_aliases(alias: str, name: str) -> None:
    assert canonical_task(alias) == name


def test_unknown_task_and_split(data_dir: Path) -> None:
    with pytest.raises(SlmembedError, match="valid names: STS12, STS13.*SICK-R"):
        load_sts("STS18", data_dir)
    with pytest.raises(SlmembedError, match="no split 'dev'"):
        load_sts("STS12", data_dir, split="dev")


@pytest.fixture
def broken(tmp_path: Path, data_dir: Path) -> Path:
    """A copy of the data directory with only the small sets copied (sts13, sts17, stsb, sickr, biosses)."""
    for folder in ("sts13", "sts17", "stsb", "sickr", "biosses"):
        shutil.copytree(data_dir / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.zip", "*.rar", "*.gz"))
    return tmp_path


def _edit_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text("utf-8").split("\n")
    lines[line - 1] = new
    path.write_text("\n".join(lines), "utf-8")


def test_copy_loads(broken: Path) -> None:
    assert len(load_sts("STS13", broken)) == 1500


@pytest.mark.parametrize("name, line, text, problem", [
    ("STS.gs.FNWN.txt", 3, "abc", "'abc'"),                            # gold score that is not a number
    ("STS.input.headlines.txt", 5, "a sentence with no tab", "found 1"),  # input line with one column
])
def test_bad_line_is_named_with_file_and_line(broken: Path, name: str, line: int, text: str, problem: str) -> None:
    path = broken / "sts13" / name
    _edit_line(path, line, text)
    with pytest.raises(DataError) as e:
        load_sts("STS13", broken)
    assert f"{path}:{line}:" in str(e.value) and problem in str(e.value)
    assert (e.value.path, e.value.line) == (str(path), line)


def test_missing_gold_file(broken: Path) -> None:
    gold = broken / "sts13" / "STS.gs.OnWN.txt"
    gold.unlink()
    with pytest.raises(DataError, match="STS.gs.OnWN.txt: file not found"):
        load_sts("STS13", broken)


def test_line_count_mismatch(broken: Path) -> None:
    gold = broken / "sts17" / "STS2017.gs" / "STS.gs.track5.en-en.txt"
    gold.write_text("".join(gold.read_text("utf-8").splitlines(keepends=True)[:-1]), "utf-8")
    with pytest.raises(DataError, match=r"STS.gs.track5.en-en.txt: 249 gold lines but 250 lines"):
        load_sts("STS17", broken)


def test_count_mismatch_names_folder_and_counts(broken: Path) -> None:
    for name in ("STS.input.FNWN.txt", "STS.gs.FNWN.txt"):
        (broken / "sts13" / name).unlink()
    with pytest.raises(DataError) as e:
        load_sts("STS13", broken)
    msg = str(e.value)
    assert str(broken / "sts13") in msg and "1500" in msg and "1311" in msg


def test_stsb_short_row_and_sick_missing_file(broken: Path) -> None:
    test_csv = broken / "stsb" / "sts-test.csv"
    _edit_line(test_csv, 2, "main-captions\tMSRvid\t2012test\t0033\t3.600\tonly one sentence")
    with pytest.raises(DataError, match=re.escape(f"{test_csv}:2: expected at least 7")):
        load_sts("stsb", broken)
    assert len(load_sts("stsb", broken, split="dev")) == 1500  # dev untouched
    (broken / "sickr" / "SICK_trial.txt").unlink()
    with pytest.raises(DataError, match="SICK_trial.txt: file not found"):
        load_sts("sickr", broken)


def test_biosses_missing_docx(broken: Path) -> None:
    (broken / "biosses" / "BIOSSES-Dataset" / "Annotator-Scores.docx").unlink()
    with pytest.raises(DataError, match="Annotator-Scores.docx: file not found"):
        load_sts("BIOSSES", broken)


def test_hub_fallback_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sts, "find_data_dir", lambda option=None, required=True: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SlmembedError, match="pip install datasets"):
        load_sts("STS12")
