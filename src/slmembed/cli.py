"""Command line: one function per command; user errors become one line on stderr and exit code 2.

Each command imports what it uses when it runs (torch and transformers take seconds to import), so ``--help`` and
the checks that come before any work answer at once."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from slmembed import outputs, train_output
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir, input_file
from slmembed.quantize import CALIBRATED, PRECISIONS
from slmembed.run import RunDir
from slmembed.spec import POOLINGS

DTYPES = ("auto", "float32", "bfloat16")  # --dtype of eval, embed, serve
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _loading(args: argparse.Namespace) -> dict:
    """How every command loads a model (load_embedder's keywords): the device and dtype that --device and --dtype ask
    for (auto: None, the device's best), and what --trust-remote-code and --allow-pickle allow; a GPU starts getting
    ready in the background (``device.start``)."""
    import torch

    from slmembed.device import resolve_device, start

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    device = resolve_device(args.device)
    start(device)
    return {"device": device, "dtype": dtype, "trust_remote_code": args.trust_remote_code,
            "allow_pickle": args.allow_pickle}


def provenance(command: str) -> dict:
    """How a result file was made: the command line, the machine, the date."""
    import datetime
    import platform

    import torch
    import transformers

    from slmembed.device import device_name, resolve_device

    return {"command": command, "device": device_name(resolve_device()),
            "host": platform.node(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__}


def _recipe(args: argparse.Namespace, name: str, model: str | None = None):
    """Load a recipe with --set overrides; remote code runs only if the recipe wants it and the user allows it."""
    from slmembed.config import load_recipe, recipe_from_dict, with_overrides

    recipe = with_overrides(load_recipe(name), args.set or [])
    if model:
        data = recipe.to_dict()
        data["model"]["name"] = model
        recipe = recipe_from_dict(data, "--model")
    if recipe.model.trust_remote_code and not args.trust_remote_code:
        raise SlmembedError(f"recipe {recipe.name} runs the model's own code: pass --trust-remote-code to allow it")
    recipe.model.trust_remote_code = args.trust_remote_code
    if recipe.model.allow_pickle and not args.allow_pickle:
        raise SlmembedError(f"recipe {recipe.name} loads pickle weights, which can run code: pass --allow-pickle")
    recipe.model.allow_pickle = args.allow_pickle
    recipe.data.skip_bad_rows = recipe.data.skip_bad_rows or args.skip_bad_rows
    return recipe


def _check_device(args: argparse.Namespace) -> None:
    """Refuse ``--device cuda`` without a GPU (auto and cpu need no check, nor the import it takes)."""
    if args.device == "cuda":
        from slmembed.device import resolve_device

        resolve_device(args.device)


@contextlib.contextmanager
def _holding_run(args: argparse.Namespace, recipe, resume: bool | None) -> Iterator[None]:
    """Hold --output, a run folder a recipe trains into, from before the heavy imports (train holds it on, checking
    again), once train_output.check allows it; and refuse --device cuda without a GPU. ``resume=None``: no --resume."""
    check = functools.partial(train_output.check, recipe, args.output, data_dir=args.data_dir, resume=resume,
                              force=args.force)
    with outputs.writing(args.output, check):
        _check_device(args)
        yield


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args, args.recipe)  # a bad recipe or output fails before torch is imported
    with _holding_run(args, recipe, args.resume):
        from slmembed.train import train

        summary = train(recipe, args.output, data_dir=args.data_dir, resume=args.resume, force=args.force,
                        device=args.device, profile=args.profile)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slmembed.atomic import write_json
    from slmembed.data.sts import load_all, load_sts

    if not (args.model or args.run):
        raise SlmembedError("eval needs --model, --run or both (a run folder names its base model)")
    adapters = args.run or [None]  # several: their ensemble (ensemble.py)
    if args.dims and len(adapters) > 1:
        raise SlmembedError("--dims scores prefixes of one model's vectors: give one --run")
    if args.output:  # a JSON beside a run's own files is fine (RUN/eval.json is what export reads)
        outputs.check_file(args.output, "eval", inputs=[args.model],
                           around=[*adapters, find_data_dir(args.data_dir, required=False)], force=args.force,
                           ours=outputs.json_by("eval"), suffixes=(".json",))
    sets = load_all(args.tasks, args.data_dir)  # bad task names and data fail before the model loads
    loading = _loading(args)  # torch, then transformers while a GPU gets ready: after the checks
    from slmembed.evaluate import evaluate, unique_sentences
    from slmembed.loading import load_embedder
    from slmembed.tables import table
    precisions = tuple(dict.fromkeys(args.precision or ()))
    calibration, calibrated = None, {}
    if any(p in CALIBRATED for p in precisions):  # int8/uint8 ranges from STSBenchmark dev, never a test set
        dev = load_sts("STSBenchmark", args.data_dir, split="dev")
        calibration = unique_sentences({"dev": dev})
        calibrated = {"calibration": f"STSBenchmark dev ({len(calibration)} sentences)"}
    overrides = {k: v for k, v in (("pooling", args.pooling), ("prompt", args.prompt)) if v is not None}
    members = [load_embedder(args.model, adapter, **loading, **overrides) for adapter in adapters]
    for member in members:
        _compile(member, args)
    if len(members) > 1:
        from slmembed.ensemble import Ensemble

        embedder = Ensemble(members, adapters)
        label, described = " + ".join(adapters), {"adapter": adapters, "members": embedder.record()}
    else:
        embedder = members[0]
        label = args.model or str(adapters[0])
        described = {"adapter": adapters[0], "spec": embedder.spec.__dict__, "dtype": embedder.weights}
    result = evaluate(embedder, sets, batch_size=args.batch_size, progress=True, precisions=precisions,
                      calibration=calibration, dims=tuple(args.dims or ()))
    compact = {f"{p}": r["scores"] for p, r in result.get("precisions", {}).items()}
    prefixes = {f"dim {d}": r["scores"] for d, r in result.get("dims", {}).items()}
    print(table({label: result["scores"], **compact, **prefixes}))
    if args.output:
        write_json(args.output, {"model": label, **described, **result, **calibrated,
                                 "run": provenance(args.command_line)})
        outputs.record_added(Path(args.output).parent, Path(args.output).name, "eval")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from slmembed.reproduce import reproduce  # torch comes once its outputs are checked and held

    if not (args.model or args.recipe):
        raise SlmembedError("reproduce needs --recipe, --model (the recipe named after the model) or both")
    recipe = _recipe(args, args.recipe or args.model, args.model if args.recipe else None)
    name = Path(args.output).name
    _check_device(args)
    reproduce(recipe, args.output, args.run or Path("runs/reproduce") / name, data_dir=args.data_dir,
              device=args.device, curve=args.curve, force=args.force,
              provenance=functools.partial(provenance, args.command_line))
    print(Path(args.output, f"{name}.md").read_text())
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from slmembed.soup import soup, text  # torch comes once the runs and the output are checked and held

    result = soup(args.run, args.output, greedy=args.greedy, tasks=args.tasks, data_dir=args.data_dir,
                  device=args.device, force=args.force, trust_remote_code=args.trust_remote_code,
                  allow_pickle=args.allow_pickle, provenance=functools.partial(provenance, args.command_line))
    print(text(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    recipe = _recipe(args, args.recipe)  # as train's, with its checks before torch is imported
    with _holding_run(args, recipe, resume=None):
        from slmembed.atomic import write_json
        from slmembed.demo import demo

        result = demo(recipe, args.output, _loading(args), data_dir=args.data_dir, device=args.device,
                      force=args.force)
        write_json(Path(args.output) / "demo.json", {**result, "run": provenance(args.command_line)})
        outputs.record_added(args.output, "demo.json", "demo")
    return 0


def _run_as_model(model: str | None) -> bool:
    """Whether --model names a training run folder, as it did before --run (which it still does, with a note)."""
    if model is not None and RunDir(model).holds_weights():
        _note("--model with a training run folder is deprecated; use --run")
        return True
    return False


def _load_model(args: argparse.Namespace, model: str | None = None, run_dir: str | Path | None = None):
    """An Embedder for ``model`` (a packaged model name, a model folder or an exported folder) or the training run
    ``run_dir``, and the id it goes by (the name, or the folder's name)."""
    from slmembed.loading import load_embedder

    embedder = load_embedder(model, run_dir, **_loading(args))
    _compile(embedder, args)
    path = Path(run_dir or model)
    return embedder, path.resolve().name if path.is_dir() else model  # "." goes by its folder's name


def _compile(embedder, args: argparse.Namespace) -> None:
    if args.compile:
        from slmembed.compile import compile_blocks

        if embedder.model is None:
            raise SlmembedError("--compile compiles a PyTorch model; an ONNX export runs in onnxruntime as it is")

        compile_blocks(embedder.model)


def cmd_export(args: argparse.Namespace) -> int:
    from slmembed.data.sts import load_all
    from slmembed.export import export

    sets = load_all(args.tasks, args.data_dir) if args.eval or args.format == "onnx" else None
    meta = export(args.run, args.output, fmt=args.format, merge=not args.no_merge, dtype=args.dtype,
                  scores=args.scores, evaluate_sets=sets, force=args.force, quantize=args.quantize,
                  max_drop=args.max_drop, accept_drop=args.accept_drop)
    print(json.dumps({"output": args.output, **meta}, indent=2))
    return 0


def _check_calibration(args: argparse.Namespace, precision: str | None = None) -> None:
    """Before the model loads: --calibration names a file, and is asked for by an int8 or uint8 ``precision``
    (None: chosen per request, as in serve)."""
    if args.calibration is None:
        return
    input_file(args.calibration, "--calibration")
    if precision is not None and precision not in CALIBRATED:
        raise SlmembedError("--calibration sets the ranges of int8 and uint8 vectors: use it with one of them")


def cmd_embed(args: argparse.Namespace) -> int:
    from slmembed.embed_file import check_output, count_texts, embed_file, load_calibration

    model, run_dir = (None, args.model) if _run_as_model(args.model) else (args.model, args.run)
    check = functools.partial(check_output, args.input, args.output, reads=[model, run_dir, args.calibration],
                              force=args.force)
    with outputs.writing(args.output, check):
        _check_calibration(args, args.precision)
        texts = count_texts(args.input, args.column)  # every row checked before the model loads
        embedder, model_id = _load_model(args, model, run_dir)
        calibration = load_calibration(args.calibration, embedder, args.batch_size) if args.calibration else None
        summary = embed_file(embedder, model_id, args.input, args.output, column=args.column,
                             chunk_size=args.chunk_size, batch_size=args.batch_size, force=args.force,
                             precision=args.precision, calibration=calibration, texts=texts)
    print(json.dumps(summary))
    return 0


def _serve_what(args: argparse.Namespace) -> tuple[str | None, list[tuple[str | None, Path]]]:
    """The model or the training runs (each with the name asked for it, if any) that serve was given; the
    positional MODEL of before keeps working, with a note."""
    model, runs = args.model, args.run or []
    if args.models:
        _note("serve MODEL is deprecated; use --model MODEL, or --run RUN for a training run (repeatable)")
        if model or runs:
            raise SlmembedError("serve: give --model or --run, not MODEL as well")
        if len(args.models) == 1 and not RunDir(args.models[0]).holds_weights():
            model = args.models[0]
        else:
            runs = [(None, Path(m)) for m in args.models]
    elif _run_as_model(model):
        model, runs = None, [(None, Path(model))]
    if not (model or runs):
        raise SlmembedError("serve needs --model MODEL, or --run RUN (repeatable for several LoRA runs)")
    return model, runs


def _served(args: argparse.Namespace, model: str | None, runs: list[tuple[str | None, Path]]):
    """One ``model`` (a name or folder) or one training run, under its name or --name; or several training ``runs``'
    adapters over their shared base model, each under its NAME= or folder's name (adapters.py)."""
    from slmembed.adapters import AdapterPool, Single

    if len(runs) == 1 and runs[0][0] and args.name:
        raise SlmembedError(f"--name and --run {runs[0][0]}=... both name the model: give one of them")
    if len(runs) <= 1:
        embedder, model_id = _load_model(args, model, runs[0][1] if runs else None)
        return Single(embedder, args.name or (runs and runs[0][0]) or model_id)
    names = [name or folder.resolve().name for name, folder in runs]
    for option, value in (("--name", args.name), ("--compile", args.compile), ("--calibration", args.calibration),
                          ("--cuda-graphs", args.cuda_graphs)):
        if value:
            raise SlmembedError(f"{option} applies to a server of one model; several runs are served under their "
                                "names")
    if len(set(names)) < len(names):
        raise SlmembedError(f"two runs would be served under one name ({', '.join(names)}): name them with "
                            "--run NAME=RUN")
    folders = [folder for _, folder in runs]
    return AdapterPool(dict(zip(names, folders, strict=True)), max_loaded=args.max_adapters, **_loading(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from slmembed.endpoint import api_key, listening

    model, runs = _serve_what(args)
    if args.cuda_graphs:
        from slmembed.device import resolve_device

        if resolve_device(args.device).type != "cuda":
            raise SlmembedError("--cuda-graphs records on a GPU; this server is on the cpu: leave --cuda-graphs out")
    key = api_key(args.api_key)
    _check_calibration(args)
    with listening(args.host, args.port) as sockets:  # bound before the model loads: a taken port fails at once
        from slmembed.serve import Limits, serve

        limits = Limits(max_inputs=args.max_inputs, max_chars=args.max_chars, max_batch=args.max_batch,
                        max_queue=args.max_queue, max_connections=args.max_connections,
                        read_timeout=args.read_timeout, request_timeout=args.request_timeout)
        served = _served(args, model, runs)
        calibration = None
        if args.calibration:
            from slmembed.embed_file import load_calibration

            calibration = load_calibration(args.calibration, served.embedder(served.names[0]))
        serve(served, sockets, limits=limits, api_key=key, calibration=calibration, cuda_graphs=args.cuda_graphs)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slmembed.report import report

    print(report(args.folder, args.output, force=args.force))
    return 0


def _integer(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


positive, count, port = _integer(1), _integer(0), _integer(1, 65535)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def served_name(text: str) -> str:
    """An argparse type: a name as clients send it, not blank and without surrounding whitespace."""
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-blank name without surrounding whitespace, got {text!r}")
    return text


def steps_window(text: str) -> tuple[int, int]:
    """An argparse type: ``FIRST:COUNT`` (steps done before a window, steps in it)."""
    first, _, count = text.partition(":")
    if not (first.isdigit() and count.isdigit() and int(count) >= 1):
        raise argparse.ArgumentTypeError(f"expected FIRST:COUNT with FIRST >= 0 and COUNT >= 1, got {text!r}")
    return int(first), int(count)


def template(text: str) -> str:
    """An argparse type: a prompt as a recipe's model.prompt accepts it."""
    from slmembed.config import ModelConfig, field_error

    expected = field_error(ModelConfig, "prompt", text)
    if expected:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return text


def served_run(text: str) -> tuple[str | None, Path]:
    """An argparse type: ``[NAME=]RUN``, a training run folder and the name it is served under (None: the folder's
    name). A folder that exists is taken whole, '=' in its name or not."""
    name, sep, folder = text.partition("=")
    if not sep or Path(text).exists():
        return None, Path(text)
    if not folder:
        raise argparse.ArgumentTypeError(f"expected [NAME=]RUN, a training run folder after '=', got {text!r}")
    return served_name(name), Path(folder)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other user error) instead of the usage text."""

    def error(self, message: str):
        # A required option with its old spelling beside it (_option) is a group of one shown option.
        message = re.sub(r"^one of the arguments (\S+) is required$", r"the following arguments are required: \1",
                         message)
        self.exit(2, f"slmembed: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _note(message: str) -> None:
    print(f"slmembed: note: {message}", file=sys.stderr)


class _Renamed(argparse.Action):
    """An option's old spelling: it does what the new one does, after one note on stderr; hidden from --help."""

    def __init__(self, option_strings: list[str], dest: str, new: argparse.Action, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=new.nargs, type=new.type, metavar=new.metavar,
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new, self.noted = new, False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if not self.noted:
            _note(f"{option_string} is deprecated; use {self.new.option_strings[0]}")
            self.noted = True
        self.new(parser, namespace, values, self.new.option_strings[0])


def _option(sp: argparse.ArgumentParser, name: str, old: str | None = None, required: bool = False,
            **kwargs) -> None:
    """Add the option ``name``; ``old``, its spelling before, keeps working for one release (``_Renamed``)."""
    group = sp.add_mutually_exclusive_group(required=required) if old else sp
    new = group.add_argument(name, required=required and not old, **kwargs)
    if old:
        group.add_argument(old, action=_Renamed, new=new, dest=new.dest)


def force(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--force", action="store_true",
                    help=f"replace {what} (only ever what slmembed wrote there)")


def _model_safety(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="allow pickle weights (pytorch_model.bin, .pt), which can run code when loaded")


def _encoding(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="auto: bf16 where the device computes it natively, else fp32")
    sp.add_argument("--compile", action="store_true",
                    help="compile the model's blocks first: faster encoding on a GPU after a one-off compile "
                         "of 10-12 s (docs/performance.md); pays for large inputs")


def _data_dir(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data-dir", help="data folder (default: $SLMEMBED_DATA, then ../shared/data)")


def _training(sp: argparse.ArgumentParser) -> None:
    """The options of the commands that train a recipe (train, reproduce, demo), but the recipe itself."""
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a recipe field, e.g. train.lr=5e-4 (repeatable)")
    sp.add_argument("--skip-bad-rows", action="store_true",
                    help="skip malformed training-data rows (counted in data.json) instead of stopping")
    _data_dir(sp)
    _model_safety(sp)


RECIPE = "recipe YAML file or the name of a shipped recipe (e.g. gemma-2b)"
BATCH = ("{} per batch (default: 1024 on a GPU, or any number up to 32,768 tokens where batches are packed; 64 on "
         "the CPU)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune a LoRA adapter with a recipe")
    _option(t, "--recipe", "--config", required=True, help=RECIPE)
    t.add_argument("--output", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    t.add_argument("--profile", nargs="?", const=(20, 10), type=steps_window, metavar="FIRST:COUNT",
                   help="profile steps FIRST+1..FIRST+COUNT (default 20:10) into the run folder's profile/")
    force(t, "an earlier run in --output")
    _training(t)
    t.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="Spearman x100 on the STS sets (MTEB conventions)")
    e.add_argument("--model", help="model name, folder or hub id (optional with --run, whose folder names it)")
    _option(e, "--run", "--adapter", action="append",
            help="training run folder or PEFT adapter folder; repeat it to score the ensemble of several runs (the "
                 "mean of their cosine similarities)")
    e.add_argument("--tasks", nargs="+", help="default: all nine")
    e.add_argument("--output", help="write the scores to this JSON file")
    force(e, "an earlier eval JSON at --output")
    e.add_argument("--pooling", choices=POOLINGS)
    e.add_argument("--prompt", type=template, help="prompt template with {} or P1/P2/P3/PromptEOL/AnglE")
    e.add_argument("--batch-size", type=positive, help=BATCH.format("sentences"))
    e.add_argument("--precision", nargs="+", choices=PRECISIONS, metavar="P",
                   help="also score compact vectors at these precisions (int8, uint8, binary, ubinary): cosine for "
                        "int8/uint8 (ranges from STSBenchmark dev), Hamming for binary/ubinary")
    e.add_argument("--dims", nargs="+", type=positive, metavar="D",
                   help="also score the first D coordinates of each embedding, renormalised (Matryoshka sizes)")
    _encoding(e)
    _data_dir(e)
    _model_safety(e)
    e.set_defaults(func=cmd_eval)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("reproduce", help="the paper's experiment: nine STS sets before, train, nine sets after")
    r.add_argument("--model", help="model; also the shipped recipe's name unless --recipe is given")
    r.add_argument("--recipe", help="recipe YAML or shipped recipe name (default: the recipe named MODEL); with "
                   "--model, the recipe with that model")
    r.add_argument("--output", required=True, help="results folder results/reproduce/NAME; files are NAME.*")
    _option(r, "--run", "--run-dir", help="training run folder (default: runs/reproduce/NAME)")
    r.add_argument("--curve", type=count, default=0, help="also score this many evenly spaced checkpoints")
    force(r, "earlier reproduce results in --output and an earlier run in --run")
    _training(r)
    r.set_defaults(func=cmd_reproduce)


def _add_soup(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("soup", help="average the weights of several training runs of one recipe (a model soup)")
    s.add_argument("--run", action="append", required=True, help="finished training run folder (two or more)")
    s.add_argument("--output", required=True, help="run folder to write the soup to")
    s.add_argument("--greedy", action="store_true",
                   help="greedy soup: add runs best first while the soup's STSBenchmark dev score does not drop "
                        "(only STSBenchmark dev chooses)")
    s.add_argument("--tasks", nargs="+", help="sets the soup is scored on once chosen (default: all nine)")
    force(s, "an earlier soup in --output")
    _data_dir(s)
    _model_safety(s)
    s.set_defaults(func=cmd_soup)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="fine-tune an offline model on the CPU; STSBenchmark before/after")
    d.add_argument("--recipe", default="demo-smollm2", help=f"{RECIPE}; default demo-smollm2")
    d.add_argument("--output", default="runs/demo", help="run folder (default runs/demo)")
    force(d, "an earlier demo run in --output")
    _training(d)
    d.set_defaults(func=cmd_demo, dtype="auto")  # "before" and "after" are scored as eval scores by default


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="a training run as a sentence-transformers (or transformers) model folder")
    _option(x, "--run", "--adapter", required=True, help="training run folder")
    x.add_argument("--output", required=True, help="model folder to write")
    force(x, "an earlier export in --output")
    x.add_argument("--format", default="st", choices=["st", "hf", "onnx"],
                   help="st: sentence-transformers; hf: transformers; onnx: one graph for onnxruntime, scored "
                        "against the PyTorch model before it is written")
    x.add_argument("--quantize", choices=["int8"], help="onnx: int8 weights (onnxruntime's dynamic quantisation)")
    x.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="onnx: largest drop of the STS average allowed (default 0.2; 1.0 with --quantize int8)")
    x.add_argument("--accept-drop", action="store_true", help="onnx: write the export even if it drops more")
    x.add_argument("--no-merge", action="store_true", help="keep the PEFT adapter instead of merging it")
    x.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default float32: the merge stays exact and sentence-transformers matches "
                        "slmembed to cosine 0.9998; auto: as the base model stores them, often half the size)")
    x.add_argument("--scores", help="eval or reproduce JSON for the model card (default: RUN/eval.json if present)")
    x.add_argument("--eval", action="store_true", help="score the exported folder for the model card")
    x.add_argument("--tasks", nargs="+", help="with --eval and for the onnx check; default: all nine")
    _data_dir(x)
    x.set_defaults(func=cmd_export)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("embed", help="embed a text (one per line), CSV or JSONL file into .npy or .parquet")
    m.add_argument("input", help="input file: .csv, .jsonl/.ndjson, or text with one text a line")
    m.add_argument("--output", required=True, help="OUT.npy or OUT.parquet; chunks go to OUT.parts/ meanwhile")
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model name or folder, or exported folder")
    which.add_argument("--run", help="training run folder")
    m.add_argument("--column", help="CSV column or JSONL field holding the text (default: text)")
    m.add_argument("--chunk-size", type=positive, default=4096, help="texts per resumable chunk")
    m.add_argument("--batch-size", type=positive, help=BATCH.format("texts"))
    m.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="compact vectors (sentence-transformers' quantize_embeddings): int8/uint8 [N, D], "
                        "binary/ubinary packed bits [N, D/8]")
    m.add_argument("--calibration", help="int8/uint8 ranges from these embeddings: an earlier float32 .npy output, "
                                         "or a text/CSV/JSONL file of texts (default: the input's own)")
    force(m, "an earlier embed output at --output")
    _model_safety(m)
    _encoding(m)
    m.set_defaults(func=cmd_embed)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="an OpenAI-compatible embeddings API (POST /v1/embeddings)")
    v.add_argument("models", nargs="*", metavar="MODEL", help=argparse.SUPPRESS)  # before --model and --run
    which = v.add_mutually_exclusive_group()
    which.add_argument("--model", help="model name or folder, or exported folder")
    which.add_argument("--run", action="append", type=served_run, metavar="[NAME=]RUN",
                       help="training run folder, served under NAME (default: the folder's name); repeat it for "
                            "several LoRA runs over one base model, served without merging")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=port, default=8000)
    v.add_argument("--name", type=served_name, help="model id in the API (default: the model name or folder name)")
    v.add_argument("--max-adapters", type=positive,
                   help="with several runs: adapters held at once; the least recently used is unloaded (default: all)")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY', KEY printable ASCII (default: "
                                     "$SLMEMBED_API_KEY; neither set: open; set but empty: refused)")
    v.add_argument("--max-inputs", type=positive, default=256, help="texts per request")
    v.add_argument("--max-chars", type=positive, default=16384, help="characters per text")
    v.add_argument("--max-batch", type=positive, default=256, help="texts per encode call, merged across requests")
    v.add_argument("--max-queue", type=positive, default=1024,
                   help="inputs waiting for (or in) the encoder; a request beyond it gets 429 at once")
    v.add_argument("--max-connections", type=positive, default=256, help="open connections; beyond it, 503")
    v.add_argument("--read-timeout", type=seconds, default=30.0,
                   help="seconds a client has to send a request's headers (else the connection is closed), then "
                        "its body (else 408); and the longest it may take none of its answer (else it is dropped)")
    v.add_argument("--calibration", help="a float32 .npy of embeddings or a file of texts: the ranges for requests "
                                         "with precision int8/uint8 (without it, those get 400)")
    v.add_argument("--request-timeout", type=seconds, default=60.0,
                   help="seconds a request may wait for its embeddings (else 503)")
    v.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay batches of up to 4,096 tokens as recorded CUDA graphs (with --compile, of the "
                        "compiled blocks): a short request's latency without the host's kernel launches (one packed "
                        "decoder on a GPU). Default: on wherever that holds; --cuda-graphs insists (else refused), "
                        "--no-cuda-graphs turns them off")
    _model_safety(v)
    _encoding(v)
    v.set_defaults(func=cmd_serve)


def _add_report(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser("report", help="markdown report with plots of a run, a reproduce result, or an ablation folder")
    o.add_argument("folder", help="training run folder, results/reproduce/NAME, or results/reproduce")
    o.add_argument("--output", help="folder for report.md and the PNGs (default: the folder itself)")
    force(o, "an earlier report.md and its PNGs")
    o.set_defaults(func=cmd_report)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="slmembed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_eval, _add_reproduce, _add_soup, _add_demo, _add_export, _add_embed, _add_serve,
                _add_report):
        add(sub)
    return p


def entry() -> int:
    """The ``slmembed`` command (and ``python -m slmembed``): ``main``, then ``skip_final_collection``."""
    try:
        return main()
    finally:
        skip_final_collection()


def skip_final_collection() -> None:
    """Leave every live object to the process's end rather than to the interpreter's last garbage collections.

    Once torch and transformers' model classes are imported, those collections walk every object the imports made,
    for memory the OS takes back anyway: 1.07 s of a Gemma-3-270M `slmembed eval`'s exit on 2 CPU cores, 0.28 s
    after this (bench/NOTES.md). Exit handlers, stream flushing and module teardown still run. Only for a process
    about to end: frozen objects are never collected again (``gc.freeze``)."""
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.command_line = shlex.join(["slmembed", *argv])  # for provenance(); also right when called in-process
    # No per-tensor loading bars (slmembed shows its own progress): transformers reads this when it is imported, so
    # commands that fail their checks never import it; a caller that imported it already is told directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        return args.func(args)
    except SlmembedError as exc:
        print(f"slmembed: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk failed a write mid-run (atomic.py names the file): an environment failure
        if exc.errno not in DISK_ERRORS:
            raise
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        print(f"slmembed: error: cannot write {exc.filename or getattr(args, 'output', '')}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slmembed: interrupted", file=sys.stderr)
        return 130
