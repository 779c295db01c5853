"""How the nine-set score grows with the number of training triplets: a recipe's data-curve runs against its seeds.

Reads `slmembed reproduce` results: RESULTS/NAME-data-1-K/NAME-data-1-K.json (the recipe on 1/K of the triplets,
``data.max_triplets``) and RESULTS/NAME-seedS/NAME-seedS.json (the full data, several seeds, averaged). Fits the
saturating power law ``score(n) = a - b * n**-c`` to the nine-set points (with the standard error of its ceiling),
and reports the gain of the last doubling (nine sets and STSBenchmark dev) and how many more doublings at that rate
the target would take (the optimistic, non-saturating reading). Writes OUT.json and OUT.png; imports no torch.

    python bench/data_curve.py --recipe gemma-3-270m-plus --output results/reproduce/data-curve-gemma-3-270m-plus
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmembed import plots  # noqa: E402
from slmembed.atomic import write_json  # noqa: E402


def _result(folder: Path) -> dict:
    return json.loads((folder / f"{folder.name}.json").read_text())


def points(results: Path, recipe: str) -> list[dict]:
    """One point per triplet count, fewest first: triplets, nine-set and dev scores, and the runs behind it."""
    by_count: dict[int, list[dict]] = {}
    for folder in sorted(results.glob(f"{recipe}-data-1-*")) + sorted(results.glob(f"{recipe}-seed*")):
        if (folder / f"{folder.name}.json").exists():
            result = _result(folder)
            by_count.setdefault(result["train"]["triplets"], []).append({"run": folder.name, **result["after"]})
    out = []
    for count in sorted(by_count):
        runs = by_count[count]
        nine = [r["average"] for r in runs]
        out.append({"triplets": count, "runs": [r["run"] for r in runs],
                    "nine": round(float(np.mean(nine)), 2),
                    "nine_std": round(float(np.std(nine, ddof=1)), 2) if len(nine) > 1 else None,
                    "stsb_dev": round(float(np.mean([r["stsb_dev"] for r in runs])), 2)})
    return out


def saturating(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * n ** -c


def fit(counts: np.ndarray, scores: np.ndarray) -> dict:
    """The power law's a (the ceiling), b, c, the standard errors of a and c (from the fit's covariance, scaled by
    its residuals; None where the points leave no degree of freedom), and its predictions at 2x and 10x the largest
    count."""
    with warnings.catch_warnings():  # three points for three parameters: no covariance, reported as None below
        warnings.simplefilter("ignore", OptimizeWarning)
        (a, b, c), cov = curve_fit(saturating, counts, scores, p0=(scores[-1] + 1, 100.0, 0.5), maxfev=20000)
    se = np.sqrt(np.diag(cov))
    top = counts[-1]
    return {"ceiling": round(a, 2), "ceiling_se": round(float(se[0]), 2) if np.isfinite(se[0]) else None,
            "b": round(b, 2), "c": round(c, 3), "c_se": round(float(se[2]), 3) if np.isfinite(se[2]) else None,
            "at_2x": round(float(saturating(2 * top, a, b, c)), 2),
            "at_10x": round(float(saturating(10 * top, a, b, c)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="the runs' name before -data-1-K / -seedS")
    ap.add_argument("--results", default=str(ROOT / "results/reproduce"))
    ap.add_argument("--target", type=float, default=84.0, help="the nine-set score to reach")
    ap.add_argument("--output", required=True, help="OUT: writes OUT.json and OUT.png")
    args = ap.parse_args()

    pts = points(Path(args.results), args.recipe)
    if len(pts) < 3:
        print(f"{args.results}: {len(pts)} triplet counts for {args.recipe}; a fit of three parameters needs three",
              file=sys.stderr)
        return 2
    counts = np.array([p["triplets"] for p in pts], dtype=float)
    nine = np.array([p["nine"] for p in pts])
    dev = np.array([p["stsb_dev"] for p in pts])
    step = math.log2(counts[-1] / counts[-2])
    last_doubling = float((nine[-1] - nine[-2]) / step)
    doublings = (args.target - nine[-1]) / last_doubling if last_doubling > 0 else math.inf
    summary = {"recipe": args.recipe, "command": " ".join(["python", "bench/data_curve.py", *sys.argv[1:]]),
               "points": pts, "fit_nine": fit(counts, nine),
               "last_doubling_gain": round(last_doubling, 2),
               "last_doubling_gain_stsb_dev": round(float((dev[-1] - dev[-2]) / step), 2), "target": args.target,
               "doublings_to_target_at_that_gain": round(doublings, 1),
               "triplets_for_target_at_that_gain":
                   round(counts[-1] * 2 ** doublings) if math.isfinite(doublings) else None}
    write_json(Path(f"{args.output}.json"), summary)

    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    grid = np.geomspace(counts[0], counts[-1] * 16, 100)
    f = summary["fit_nine"]
    ax.plot(counts, nine, "o", color="#1f6feb", label="nine-set average (measured)")
    ax.plot(grid, saturating(grid, f["ceiling"], f["b"], f["c"]), "-", color="#1f6feb", alpha=0.5,
            label=f"fit a - b n^-c, ceiling {f['ceiling']}"
                  + (f" +- {f['ceiling_se']}" if f["ceiling_se"] is not None else ""))
    ax.axhline(args.target, color="#f0883e", linestyle="--", label=f"target {args.target}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training triplets")
    ax.set_ylabel("Spearman x100")
    ax.set_title(f"{args.recipe}: score against data")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    plots.save(fig, Path(f"{args.output}.png"))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
