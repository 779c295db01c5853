"""Sharded (FSDP, ``train.sharding: fsdp``) against data-parallel (DDP) training: the same loss curve, and the cost.

Both runs use the same processes, recipe, steps and batches; only ``train.sharding`` differs. Reported: the losses
logged every ``--warmup`` steps by each run and their largest relative difference, triplets/s after warm-up, peak
GPU memory of rank 0, each process's peak host memory (sharded, only the first process reads the weights), and both
adapters' nine-set averages (bench/multi_gpu.py's ``train`` and ``nine_set``). ``--device cpu`` runs it over gloo.

    python bench/sharded.py --config gemma-3-270m --per-device-batch 60 --gpus 2 --steps 100 --warmup 10 \\
        --output results/bench/sharded-gemma-3-270m.json
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

from common import save
from multi_gpu import arguments, nine_set, parse, train

from slmembed.report import read_log
from slmembed.run import RunDir


def main() -> None:
    args = parse(arguments(__doc__, steps=100, warmup=10))
    args.profile = None

    scratch = Path(tempfile.mkdtemp(prefix="sharded-"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    runs, curves = {}, {}
    for mode in ("none", "fsdp"):
        run_args = copy.copy(args)
        run_args.set = [*args.set, f"train.sharding={mode}"]
        runs[mode] = train(launcher, scratch / mode, args.per_device_batch, run_args)
        runs[mode]["nine_set_average"] = nine_set(scratch / mode, args)
        curves[mode] = [r["loss"] for r in read_log(RunDir(scratch / mode).log) if "loss" in r]
    ddp, fsdp = runs["none"], runs["fsdp"]
    save(args.output, {
        "config": args.config, "per_device_batch": args.per_device_batch, "gpus": args.gpus, "steps": args.steps,
        "timed_steps": args.steps - args.warmup, "ddp": ddp, "fsdp": fsdp,
        "losses": {"ddp": curves["none"], "fsdp": curves["fsdp"], "every": args.warmup},
        "max_relative_loss_difference": round(max(abs(a - b) / abs(a) for a, b in zip(curves["none"],
                                                                                      curves["fsdp"], strict=True)), 5),
        "speed_fsdp_over_ddp": round(fsdp["triplets_per_s"] / ddp["triplets_per_s"], 3),
        "quality_difference": round(fsdp["nine_set_average"] - ddp["nine_set_average"], 2),
    })


if __name__ == "__main__":
    main()
