"""Command line: one function per command; user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmembed.errors import SlmembedError
from slmembed.models import resolve_device


def provenance() -> dict:
    """How a result file was made: the command line, the machine and the date."""
    import datetime
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {"command": " ".join(["slmembed", *sys.argv[1:]]), "device": device, "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}


def _recipe(args: argparse.Namespace, name: str, model: str | None = None):
    """Load a recipe with --set overrides; remote code runs only if the recipe wants it and the user allows it."""
    from slmembed.config import load_recipe, with_overrides

    recipe = with_overrides(load_recipe(name), args.set or [])
    if model:
        recipe.model.name = model
    if recipe.model.trust_remote_code and not args.trust_remote_code:
        raise SlmembedError(f"recipe {recipe.name} runs the model's own code: pass --trust-remote-code to allow it")
    recipe.model.trust_remote_code = args.trust_remote_code
    resolve_device(args.device)
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    from slmembed.train import train

    recipe = _recipe(args, args.config)
    summary = train(recipe, args.output, data_dir=args.data_dir, resume=args.resume, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from slmembed.atomic import write_json
    from slmembed.data.sts import load_all
    from slmembed.embedder import load_embedder
    from slmembed.evaluate import evaluate, table

    sets = load_all(args.tasks, args.data_dir)  # bad task names and data fail before the model loads
    overrides = {k: v for k, v in (("pooling", args.pooling), ("prompt", args.prompt)) if v is not None}
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    embedder = load_embedder(args.model, args.adapter, device=resolve_device(args.device), dtype=dtype,
                             trust_remote_code=args.trust_remote_code, **overrides)
    result = evaluate(embedder, sets, batch_size=args.batch_size, progress=True)
    label = args.model or str(args.adapter)
    print(table({label: result["scores"]}))
    if args.output:
        write_json(args.output, {"model": label, "adapter": args.adapter, "spec": embedder.spec.__dict__,
                                 "dtype": str(next(embedder.model.parameters()).dtype), **result,
                                 "run": provenance()})
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from slmembed.reproduce import reproduce

    recipe = _recipe(args, args.recipe or args.model, args.model if args.recipe else None)
    name = Path(args.output).name
    reproduce(recipe, args.output, args.run_dir or Path("runs/reproduce") / name, data_dir=args.data_dir,
              device=args.device, curve=args.curve, provenance=provenance())
    print(Path(args.output, f"{name}.md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slmembed.atomic import write_json
    from slmembed.demo import demo

    result = demo(args.output, args.recipe, args.set, data_dir=args.data_dir, device=args.device)
    write_json(Path(args.output) / "demo.json", {**result, "run": provenance()})
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slmembed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, recipe: bool = False) -> None:
        if recipe:
            sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="override a recipe field, e.g. train.lr=5e-4 (repeatable)")
        sp.add_argument("--data-dir", help="data folder (default: $SLMEMBED_DATA, then ../shared/data)")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")

    t = sub.add_parser("train", help="fine-tune a LoRA adapter with a recipe")
    t.add_argument("--config", required=True, help="recipe YAML file or name in configs/ (e.g. gemma-2b)")
    t.add_argument("--output", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    common(t, recipe=True)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="Spearman x100 on the STS sets (MTEB conventions)")
    e.add_argument("--model", help="model name, folder or hub id (optional with a run folder as --adapter)")
    e.add_argument("--adapter", help="training run folder or PEFT adapter folder")
    e.add_argument("--tasks", nargs="+", help="default: all nine")
    e.add_argument("--output", help="write the scores to this JSON file")
    e.add_argument("--pooling", choices=["last", "mean", "cls"])
    e.add_argument("--prompt", help="prompt template with {} or P1/P2/P3")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 where the device computes it natively, else fp32")
    common(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reproduce", help="the paper's experiment: nine STS sets before, train, nine sets after")
    r.add_argument("--model", required=True, help="model; also the recipe name in configs/ unless --recipe is given")
    r.add_argument("--recipe", help="recipe YAML or name (default: configs/MODEL.yaml)")
    r.add_argument("--output", required=True, help="results folder results/reproduce/NAME; files are NAME.*")
    r.add_argument("--run-dir", help="training run folder (default: runs/reproduce/NAME)")
    r.add_argument("--curve", type=int, default=0, help="also score this many evenly spaced checkpoints")
    common(r, recipe=True)
    r.set_defaults(func=cmd_reproduce)

    d = sub.add_parser("demo", help="fine-tune an offline model on the CPU; STSBenchmark before/after")
    d.add_argument("--recipe", default="demo-smollm2")
    d.add_argument("--output", default="runs/demo")
    common(d, recipe=True)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-tensor loading bars; slmembed shows its own progress
    try:
        return args.func(args)
    except SlmembedError as exc:
        print(f"slmembed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slmembed: interrupted", file=sys.stderr)
        return 130
