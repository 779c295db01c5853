"""Wall times of the CPU paths a user meets first: the demo and the test suite, each in a fresh process.

    python bench/cpu_times.py --output results/bench/cpu.json        # 10 to 25 minutes on 2 cores
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
    """Wall seconds of ``command``; if it fails, the end of what it printed (a failed test's report), then the exit."""
    t = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-20000:]}")
    return round(time.perf_counter() - t, 1)


def _matmul_gflop_s(dtype) -> float:
    import torch

    a = torch.randn(2048, 2048).to(dtype)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return round(10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9, 1)


def machine_speed() -> dict:
    """How fast this machine is right now: float32 and bf16 matmuls (torch's threads) and a pure-Python loop. Shared
    2-core machines differ by 2x from day to day, so times measured on different days are compared through these;
    the bf16 figure shows whether the CPU computes bf16 natively (slmembed then uses it: ``device.computes_bf16``)."""
    import torch

    from slmembed.device import computes_bf16

    fp32, bf16 = _matmul_gflop_s(torch.float32), _matmul_gflop_s(torch.bfloat16)
    t = time.perf_counter()
    sum(range(10**7))
    return {"matmul_fp32_gflop_s": fp32, "matmul_bf16_gflop_s": bf16, "native_bf16": computes_bf16(torch.device("cpu")),
            "python_loop_1e7_s": round(time.perf_counter() - t, 3), "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    speed_before = machine_speed()
    with tempfile.TemporaryDirectory() as tmp:
        demo = [sys.executable, "-m", "slmembed", "demo", "--output", str(Path(tmp) / "demo")]
        demo_s = timed(demo)
        demo_result = json.loads((Path(tmp) / "demo" / "demo.json").read_text())
    tests = [sys.executable, "-m", "pytest", "-q", "-n", "auto", "-p", "no:cacheprovider"]  # as the README runs it
    tests_s = timed(tests)
    save(args.output, {
        "demo": {"wall_s": demo_s, "command": "slmembed demo",
                 "stsb_before": demo_result["before"], "stsb_after": demo_result["after"]},
        "test_suite": {"wall_s": tests_s, "command": "python -m pytest -q -n auto"},
        "machine_speed": {"before": speed_before, "after": machine_speed()},
    })


if __name__ == "__main__":
    main()
