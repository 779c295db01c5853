"""bench/data_curve.py: a recipe's score against its training triplets, from reproduce results, and its ceiling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _result(results: Path, name: str, triplets: int, nine: float, dev: float) -> None:
    folder = results / name
    folder.mkdir(parents=True)
    (folder / f"{name}.json").write_text(json.dumps(
        {"train": {"triplets": triplets}, "after": {"average": nine, "stsb_dev": dev}}))


def _run(results: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "data_curve.py"), "--recipe", "r", "--results", str(results),
                           "--target", "84", "--output", str(out)], capture_output=True, text=True)


def test_the_fit_recovers_the_ceiling_of_an_exact_power_law(tmp_path: Path) -> None:
    """Points on 82.5 - 700 n^-0.65 (the full data as two seeds around it): the fit gives back a, b and c, the seeds
    are one point (their mean and spread), and the last doubling's gain and the doublings to the target follow."""
    law = lambda n: 82.5 - 700 * n ** -0.65  # noqa: E731
    results = tmp_path / "reproduce"
    for k, n in ((8, 5000), (4, 10000), (2, 20000)):
        _result(results, f"r-data-1-{k}", n, round(law(n), 4), 86.0)
    _result(results, "r-seed42", 40000, round(law(40000) + 0.1, 4), 86.5)
    _result(results, "r-seed7", 40000, round(law(40000) - 0.1, 4), 86.7)
    _result(results, "other-seed42", 40000, 99.0, 99.0)  # another recipe's run: not read
    out = _run(results, tmp_path / "curve")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "curve.json").read_text())
    assert [p["triplets"] for p in summary["points"]] == [5000, 10000, 20000, 40000]
    assert summary["points"][-1]["runs"] == ["r-seed42", "r-seed7"]
    assert summary["points"][-1]["nine_std"] == 0.14 and summary["points"][-1]["stsb_dev"] == 86.6
    fit = summary["fit_nine"]
    assert abs(fit["ceiling"] - 82.5) < 0.05 and abs(fit["c"] - 0.65) < 0.02
    assert fit["ceiling_se"] < 0.05 and fit["c_se"] < 0.01  # on the law: only the rounding is left
    gain = round(law(40000), 2) - round(law(20000), 2)
    assert abs(summary["last_doubling_gain"] - gain) < 0.011
    assert abs(summary["doublings_to_target_at_that_gain"] - (84 - round(law(40000), 2)) / gain) < 0.2
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_the_ceiling_s_error_grows_with_scatter_and_is_none_without_a_degree_of_freedom(tmp_path: Path) -> None:
    """Four points off the law by +-0.4 give a ceiling error far above the exact law's; three points leave the fit
    no degree of freedom, so its errors are None (not infinite, not made up)."""
    law = lambda n: 82.5 - 700 * n ** -0.65  # noqa: E731
    results = tmp_path / "reproduce"
    for k, n, off in ((8, 5000, 0.4), (4, 10000, -0.4), (2, 20000, 0.4), (1, 40000, -0.4)):
        _result(results, f"r-data-1-{k}", n, round(law(n) + off, 4), 86.0)
    assert _run(results, tmp_path / "noisy").returncode == 0
    assert json.loads((tmp_path / "noisy.json").read_text())["fit_nine"]["ceiling_se"] > 0.5
    (results / "r-data-1-1" / "r-data-1-1.json").unlink()
    assert _run(results, tmp_path / "three").returncode == 0
    fit = json.loads((tmp_path / "three.json").read_text())["fit_nine"]
    assert fit["ceiling_se"] is None and fit["c_se"] is None


def test_fewer_than_three_counts_is_refused_in_one_line(tmp_path: Path) -> None:
    results = tmp_path / "reproduce"
    _result(results, "r-data-1-2", 20000, 81.0, 86.0)
    _result(results, "r-seed42", 40000, 81.5, 86.5)
    out = _run(results, tmp_path / "curve")
    assert out.returncode == 2 and "2 triplet counts" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "curve.json").exists()
