"""Wall times of the CPU paths a user meets first: the demo and the test suite, each in a fresh process.

    python bench/cpu_times.py --output results/bench/cpu.json        # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - t, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = [sys.executable, "-m", "slmembed", "demo", "--output", str(Path(tmp) / "demo")]
        demo_s = timed(demo)
        demo_result = json.loads((Path(tmp) / "demo" / "demo.json").read_text())
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    tests_s = timed(tests)
    save(args.output, {
        "demo": {"wall_s": demo_s, "command": "slmembed demo",
                 "stsb_before": demo_result["before"], "stsb_after": demo_result["after"]},
        "test_suite": {"wall_s": tests_s, "command": "python -m pytest -q"},
    })


if __name__ == "__main__":
    main()
