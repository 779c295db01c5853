"""Where the wall time of ``slmembed eval`` goes: the command's steps, timed one by one in a fresh process.

    python bench/eval_phases.py --model gemma-3-270m       # one fresh process: one JSON line of seconds per phase
    python bench/eval_phases.py --model gemma-3-270m --repeats 4 --output results/bench/eval-phases-MODEL-DEVICE.json

With ``--repeats N`` it runs the phases in N fresh processes, one after another, then ``slmembed eval`` itself N
times (the wall time of the whole command as a user starts it, interpreter included, and its CPU seconds), prints
each and their medians, and with ``--output`` writes them with the commands and the machine (``common.save``). Each
phase has its wall seconds and, under ``cpu_s``, the seconds the process spent on the CPU (all its threads), which
other work on a busy machine inflates less. ``--tasks`` and ``--passes`` time less than the nine sets' encoding (on a
CPU, where it takes minutes).
"""

from __future__ import annotations

import time

START, START_CPU, START_EPOCH = time.perf_counter(), time.process_time(), time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def phases(args: argparse.Namespace) -> dict:
    """The steps of ``cli.cmd_eval``, in its order, each timed (GPU work waited for)."""
    wall, cpu = {}, {}
    last = [START, START_CPU]

    def mark(name: str) -> None:
        if "torch" in sys.modules and torch.cuda.is_initialized():  # no CUDA start here that the command would not do
            torch.cuda.synchronize()
        now = [time.perf_counter(), time.process_time()]
        wall[name], cpu[name] = round(now[0] - last[0], 3), round(now[1] - last[1], 3)
        last[:] = now

    import torch

    mark("import torch")
    from slmembed import cli
    from slmembed.data.sts import TASKS, load_all

    mark("import slmembed.cli")
    sets = load_all(args.tasks or TASKS, args.data_dir)
    mark("read the sets")
    loading = cli._loading(cli.parser().parse_args(["eval", "--model", args.model]))  # as `slmembed eval` reads it
    mark("resolve the device")
    from slmembed.embedder import batching
    from slmembed.evaluate import score, unique_sentences
    from slmembed.loading import load_embedder

    mark("import slmembed.embedder, transformers")
    embedder = load_embedder(args.model, **loading)
    mark("load model")
    texts = unique_sentences(sets)
    batch, max_tokens = batching(embedder)
    for index in range(args.passes):
        vecs = embedder.encode(texts, batch_size=batch, max_tokens=max_tokens)
        mark(f"tokenise and encode, {('first', 'second')[index]} pass")
    if args.passes:
        score(sets, dict(zip(texts, vecs, strict=True)))
        mark("score")
    return {"phases_s": wall, "cpu_s": cpu, "sentences": len(texts), "device": str(embedder.device),
            "epochs": [START_EPOCH, time.time()]}


def _median(runs: list[dict]) -> dict:
    return {name: round(statistics.median(r[name] for r in runs), 3) for name in runs[0]}


def repeated(args: argparse.Namespace, options: list[str], extra: list[str]) -> dict:
    """``args.repeats`` fresh processes of the phases (``options`` and ``extra``), then as many of the command itself
    (``options``)."""
    runs = []
    for _ in range(args.repeats):
        spawned = time.time()
        done = subprocess.run([sys.executable, __file__, *options, *extra], check=True, capture_output=True, text=True)
        exited = time.time()
        run = json.loads(done.stdout.splitlines()[-1])
        first, last = run.pop("epochs")
        # outside the phases: the interpreter's start (up to this file's first line) and the process's end (after
        # its last phase: CUDA's and Python's teardown)
        run["phases_s"] = {"interpreter start": round(first - spawned, 3), **run["phases_s"],
                           "process exit": round(exited - last, 3)}
        runs.append(run)
        print(json.dumps(run), flush=True)
    command = [sys.executable, "-m", "slmembed", "eval", *options]
    walls, cpus = [], []
    for _ in range(0 if args.phases_only else args.repeats):
        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(round(time.perf_counter() - start, 3))
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(round(used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime, 3))
        print(json.dumps({"slmembed eval, wall_s": walls[-1], "cpu_s": cpus[-1]}), flush=True)
    result = {"model": args.model, "tasks": args.tasks or "all nine", "repeats": args.repeats,
              "commands": {"phases": " ".join(["python", sys.argv[0], *options, *extra]),
                           "eval": " ".join(["python", "-m", "slmembed", "eval", *options])},
              "sentences": runs[0]["sentences"], "device": runs[0]["device"],
              "median_phases_s": _median([r["phases_s"] for r in runs]),
              "median_cpu_s": _median([r["cpu_s"] for r in runs]),
              "median_eval_wall_s": statistics.median(walls) if walls else None, "eval_wall_s": walls,
              "median_eval_cpu_s": statistics.median(cpus) if cpus else None, "eval_cpu_s": cpus,
              "phases_s": [r["phases_s"] for r in runs], "cpu_s": [r["cpu_s"] for r in runs]}
    print(json.dumps({k: result[k] for k in ("median_phases_s", "median_cpu_s", "median_eval_wall_s",
                                             "median_eval_cpu_s")}))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--data-dir")
    p.add_argument("--passes", type=int, choices=(0, 1, 2), default=2,
                   help="encodes of the sentences (the first is the command's; 0: up to the model's load only)")
    p.add_argument("--repeats", type=int, help="fresh processes of the phases, then of `slmembed eval`")
    p.add_argument("--phases-only", action="store_true", help="with --repeats: not `slmembed eval` itself")
    p.add_argument("--output", help="with --repeats: the JSON to write")
    args = p.parse_args()
    if not args.repeats:
        print(json.dumps(phases(args)))
        from slmembed.cli import skip_final_collection  # imported by the phases already

        skip_final_collection()  # as the command leaves: the "process exit" phase is the command's
        return
    options = ["--model", args.model, *(["--tasks", *args.tasks] if args.tasks else []),
               *(["--data-dir", args.data_dir] if args.data_dir else [])]
    result = repeated(args, options, ["--passes", str(args.passes)])
    if args.output:
        from common import save  # torch and transformers: in this parent process only, never in a timed one

        save(args.output, result)


if __name__ == "__main__":
    main()
