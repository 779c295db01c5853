"""Start-up: ``slmembed --help`` and each command's ``--help`` in fresh processes, and what importing the CLI loads.

    python bench/startup.py --output results/bench/startup-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import save

COMMANDS = ["train", "eval", "export", "embed", "serve", "demo", "reproduce", "report"]
HEAVY = ["torch", "transformers", "peft", "sentence_transformers", "scipy", "onnxruntime"]


def median_seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "slmembed", *args], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    probe = f"import sys, slmembed.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    save(args.output, {
        "repeats": args.repeats, "help_s": median_seconds(["--help"], args.repeats),
        "command_help_s": {c: median_seconds([c, "--help"], args.repeats) for c in COMMANDS},
        "heavy_modules_loaded_by_import_slmembed_cli": loaded.split(",") if loaded else [],
    })


if __name__ == "__main__":
    main()
