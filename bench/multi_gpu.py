"""Data-parallel scaling with cross-device negatives: one GPU at batch 2B against N GPUs at batch B each.

Both runs train the same recipe for the same steps on the same triplets with the same global batch, so they compute
the same loss over the same negatives: the N-GPU run gathers every rank's embeddings into each rank's loss
(losses/infonce.py). Rates come from the training logs, between a step after warm-up and the last; both adapters are
then scored on the nine STS sets. NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the device docs require.
``--profile FIRST:COUNT`` also profiles both runs (``slmembed train --profile``, profiling.py): each process's
step times (wall, host busy, GPU busy, NCCL) go into the JSON and its operator tables beside it.

    python bench/multi_gpu.py --config gemma-3-270m --per-device-batch 60 --gpus 2 --steps 300 \\
        --output results/bench/multi-gpu-gemma-3-270m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import log_window, save

from slmembed.run import RunDir


def train(command: list[str], run_dir: Path, batch: int, args: argparse.Namespace) -> dict:
    """Run one training command; its rate (triplets/s after warm-up), peak GPU memory and last loss from its log,
    and each process's peak host memory from its summary."""
    sets = [f"train.batch_size={batch}", f"train.max_steps={args.steps}", f"train.log_every={args.warmup}",
            "train.save_every=1000000000", *args.set]
    command = [*command, "-m", "slmembed", "train", "--config", args.config, "--output", str(run_dir),
               "--device", args.device, *(x for s in sets for x in ("--set", s))]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.profile:
        command += ["--profile", args.profile]
    subprocess.run(command, check=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0", "TQDM_DISABLE": "1"})
    last, seconds = log_window(run_dir, args.warmup, args.steps)
    summary = RunDir(run_dir).summary()
    result = {"command": " ".join("python" if c == sys.executable else c for c in command),
              "global_batch": summary["batch_size"],
              "triplets_per_s": round((args.steps - args.warmup) * summary["batch_size"] / seconds, 1),
              "peak_gib_rank0": last.get("peak_gib"), "host_peak_gib": summary["host_peak_gib"],
              "final_loss": last["loss"]}
    if args.profile:
        stem = Path(args.output).with_suffix("")
        profile = RunDir(run_dir).profile
        result["profile"] = [json.loads(f.read_text()) for f in sorted(profile.glob("rank*.json"))]
        for table in sorted(profile.glob("rank*.txt")):
            shutil.copyfile(table, f"{stem}-profile-{run_dir.name}-{table.name}")
    return result


def nine_set(run_dir: Path, args: argparse.Namespace) -> float:
    out = RunDir(run_dir).scores
    command = [sys.executable, "-m", "slmembed", "eval", "--adapter", str(run_dir), "--output", str(out),
               "--device", args.device, "--tasks", *args.tasks]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.read_text())["average"]


def arguments(doc: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options of a run pair (this script's and bench/sharded.py's)."""
    from slmembed.data.sts import TASKS

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gemma-3-270m", help="recipe name or YAML file")
    p.add_argument("--per-device-batch", type=int, default=60)
    p.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="steps before the timed window (also the log interval)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="cpu: a gloo smoke run")
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (the log interval)")
    return args


def main() -> None:
    p = arguments(__doc__, steps=300, warmup=20)
    p.add_argument("--profile", metavar="FIRST:COUNT", help="profile both runs' steps FIRST+1..FIRST+COUNT")
    args = parse(p)

    scratch = Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    b = args.per_device_batch
    one = train([sys.executable], scratch / "one", args.gpus * b, args)
    many = train([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"],
                 scratch / "many", b, args)
    for result, run in ((one, "one"), (many, "many")):
        result["nine_set_average"] = nine_set(scratch / run, args)
    save(args.output, {
        "config": args.config, "per_device_batch": b, "gpus": args.gpus, "steps": args.steps,
        "timed_steps": args.steps - args.warmup, "one_process": one, f"{args.gpus}_processes": many,
        "scaling": round(many["triplets_per_s"] / one["triplets_per_s"], 2),
        "quality_difference": round(many["nine_set_average"] - one["nine_set_average"], 2),
    })


if __name__ == "__main__":
    main()
