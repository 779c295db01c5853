"""Several machines, simulated on one host: two torchrun launchers over loopback against one, and a launcher killed.

Three runs of one recipe, with the same steps and global batch (``--per-process-batch`` x all processes):

* **single**: one launcher of 2N processes (``torchrun --standalone --nproc_per_node=2N``);
* **two launchers**: ``torchrun --nnodes=2 --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT``
  started twice, as two machines would start it (README, "Several GPUs and several machines");
* **killed**: the same two launchers; once the run folder holds its first checkpoint, the second launcher and its
  workers are lost: SIGKILL (``--lose kill``, a machine gone), or SIGSTOP (``--lose freeze``, a machine that stops
  answering with its connections open: the others' collectives would wait for their timeout, so only slmembed's
  watcher, liveness.py, stops them). The survivor must stop on its own within ``--grace`` seconds; then the lost
  launcher is killed and both start again with ``--resume``.

It reports the largest difference between the adapters (two launchers vs single, resumed vs uninterrupted), the
losses logged, wall times, the step the kill hit and how the survivor ended. On a GPU host each launcher gets its own
GPUs (CUDA_VISIBLE_DEVICES), so its local ranks start at 0 as on a real node; on the CPU the processes talk over gloo.

    python bench/multi_node.py --config smollm2-135m --device cpu --per-process-batch 4 --steps 12 --save-every 4 \\
        --set model.max_length=32 --output results/bench/multi-node-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from common import free_port, save
from safetensors.torch import load_file

from slmembed.run import ADAPTER_WEIGHTS, Checkpoint, RunDir


def train_command(args: argparse.Namespace, run_dir: Path, launcher: list[str], resume: bool = False) -> list[str]:
    sets = [f"train.batch_size={args.per_process_batch}", f"train.max_steps={args.steps}",
            f"train.save_every={args.save_every}", "train.log_every=1", *args.set]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "slmembed", "train",
               "--config", args.config, "--output", str(run_dir), "--device", args.device,
               *(x for s in sets for x in ("--set", s))]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return command + (["--resume"] if resume else [])


def env_for(args: argparse.Namespace, launcher: int | None) -> dict[str, str]:
    """One thread a process (as torchrun sets for several local processes), and the launcher's own GPUs: launcher
    k of the two-node run gets its N, the single launcher (``None``) all 2N."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "NCCL_NVLS_ENABLE": "0"}
    if args.device != "cpu":
        n = args.procs_per_launcher
        gpus = range(2 * n) if launcher is None else range(launcher * n, (launcher + 1) * n)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def start_launchers(args: argparse.Namespace, run_dir: Path, log_dir: Path, tag: str,
                    resume: bool = False) -> tuple[list[subprocess.Popen], list[str]]:
    """Both launchers of the two-node run. The first serves the rendezvous store, as the machine named by
    ``--rdzv_endpoint`` does: the second starts once the first listens (the second is the one lost later)."""
    port, procs, commands = free_port(), [], []
    for node in range(2):
        launcher = ["--nnodes=2", f"--nproc_per_node={args.procs_per_launcher}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={tag}", "--max_restarts=0"]
        command = train_command(args, run_dir, launcher, resume)
        with open(log_dir / f"{tag}-launcher{node}.log", "w") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env_for(args, node)))
        commands.append(" ".join(command))
        deadline = time.time() + 120
        while node == 0 and not listening(port):
            if time.time() > deadline or procs[0].poll() is not None:
                raise SystemExit(f"the first launcher did not open its rendezvous store: {log_dir / tag}-launcher0.log")
            time.sleep(0.1)
    return procs, commands


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_machine(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a launcher and everything under it (SIGKILL: lost; SIGSTOP: frozen): torchrun starts its workers in
    sessions of their own."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_all(procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    for p in procs:
        if p.wait(timeout=max(1.0, deadline - time.time())) != 0:
            raise SystemExit(f"{what}: a launcher exited with {p.returncode} (logs in the scratch folder)")


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run_dir).adapter / ADAPTER_WEIGHTS)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), "the adapters hold different tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in RunDir(run_dir).log.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2-135m", help="recipe name or YAML file")
    p.add_argument("--procs-per-launcher", type=int, default=1, help="N: processes (GPUs) per simulated machine")
    p.add_argument("--per-process-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=4, help="checkpoint interval; the kill follows the first one")
    p.add_argument("--grace", type=float, default=180.0, help="seconds the survivor may take to stop by itself")
    p.add_argument("--lose", choices=["kill", "freeze"], default="kill",
                   help="how the second launcher's machine is lost: SIGKILL, or SIGSTOP (frozen, connections open)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    if args.steps <= args.save_every:
        p.error("--steps must exceed --save-every: the kill comes after the first checkpoint")

    scratch = Path(tempfile.mkdtemp(prefix="multi-node-"))
    n = 2 * args.procs_per_launcher

    # single launcher
    command = train_command(args, scratch / "single", ["--standalone", f"--nproc_per_node={n}"])
    t = time.time()
    with open(scratch / "single.log", "w") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env_for(args, None),
                          timeout=args.timeout).returncode:
            raise SystemExit(f"the single-launcher run failed: {scratch / 'single.log'}")
    single = {"command": " ".join(command), "seconds": round(time.time() - t, 1)}

    # two launchers, uninterrupted
    t = time.time()
    procs, commands = start_launchers(args, scratch / "nodes", scratch, "nodes")
    wait_all(procs, args.timeout, "the two-launcher run")
    nodes = {"commands": commands, "seconds": round(time.time() - t, 1)}

    # two launchers, the second killed after the first checkpoint, then both resumed
    run = scratch / "killed"
    procs, commands = start_launchers(args, run, scratch, "killed")
    deadline = time.time() + args.timeout
    while not RunDir(run).checkpoints():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("no checkpoint before a launcher ended: make --steps larger than --save-every")
        time.sleep(0.02)
    kill_machine(procs[1], signal.SIGKILL if args.lose == "kill" else signal.SIGSTOP)
    killed_at = time.time()
    logged = losses(run) if RunDir(run).log.exists() else []
    try:
        survivor_code = procs[0].wait(timeout=args.grace)
        survivor = {"exit_code": survivor_code, "stopped_after_s": round(time.time() - killed_at, 1)}
    except subprocess.TimeoutExpired:
        kill_machine(procs[0])
        survivor = {"exit_code": None, "stopped_after_s": None, "hung": f"still running {args.grace} s after the kill"}
    said = [line for line in (scratch / "killed-launcher0.log").read_text().splitlines() if "slmembed train:" in line]
    survivor["said"] = said[0] if said else None  # the watcher's line, when it was the one that stopped it
    kill_machine(procs[1])  # a frozen one too, now
    procs[1].wait()
    resumed_from = Checkpoint(RunDir(run).checkpoints()[-1]).step
    t = time.time()
    procs, resume_commands = start_launchers(args, run, scratch, "resumed", resume=True)
    wait_all(procs, args.timeout, "the resumed two-launcher run")
    killed = {"lost_by": args.lose, "commands": commands, "resume_commands": resume_commands,
              "steps_logged_before_kill": len(logged),
              "survivor": survivor, "resumed_from_step": resumed_from, "resume_seconds": round(time.time() - t, 1)}

    ref, two, resumed = adapter(scratch / "single"), adapter(scratch / "nodes"), adapter(run)
    summary = RunDir(run).summary()
    save(args.output, {
        "config": args.config, "sets": args.set, "device": args.device, "launchers": 2,
        "processes_per_launcher": args.procs_per_launcher, "world_size": summary["world_size"],
        "global_batch": summary["batch_size"], "steps": args.steps, "save_every": args.save_every,
        "single_launcher": single, "two_launchers": nodes, "killed_and_resumed": killed,
        "adapter_tensors": len(ref),
        "adapter_max_abs": round(max(v.float().abs().max().item() for v in ref.values()), 6),
        "max_abs_diff_two_launchers_vs_single": max_diff(two, ref),
        "max_abs_diff_resumed_vs_uninterrupted": max_diff(resumed, two),
        "losses": {"single": losses(scratch / "single"), "two_launchers": losses(scratch / "nodes"),
                   "resumed": losses(run)},
        "scratch": str(scratch),
    })


if __name__ == "__main__":
    main()
