"""Command line: one function per command; user errors become one line on stderr and exit code 2.

Each command imports what it uses when it runs (torch and transformers take seconds to import), so ``--help`` and
the checks that come before any work answer at once."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import shlex
import sys
from pathlib import Path

from slmembed import outputs, train_output
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir, input_file
from slmembed.quantize import CALIBRATED, PRECISIONS
from slmembed.spec import POOLINGS

DTYPES = ("auto", "float32", "bfloat16")  # --dtype of eval, embed, serve
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _loading(args: argparse.Namespace) -> dict:
    """The device and dtype that --device and --dtype ask for (auto: None, the device's best); a GPU starts getting
    ready in the background (``models.start``)."""
    import torch

    from slmembed.models import resolve_device, start

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    device = resolve_device(args.device)
    start(device)
    return {"device": device, "dtype": dtype}


def provenance(command: str) -> dict:
    """How a result file was made: the command line, the machine, the date."""
    import datetime
    import platform

    import torch
    import transformers

    from slmembed.models import device_name, resolve_device

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
        from slmembed.models import resolve_device

        resolve_device(args.device)


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args, args.config)  # a bad recipe or output fails before torch is imported
    check = functools.partial(train_output.check, recipe, args.output, data_dir=args.data_dir, resume=args.resume,
                              force=args.force)
    with outputs.writing(args.output, check):  # held from before the imports: train holds it on, checking again
        _check_device(args)
        from slmembed.train import train

        summary = train(recipe, args.output, data_dir=args.data_dir, resume=args.resume, force=args.force,
                        device=args.device, profile=args.profile)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slmembed.atomic import write_json
    from slmembed.data.sts import load_all, load_sts

    adapters = args.adapter or [None]  # several: their ensemble (ensemble.py)
    if args.dims and len(adapters) > 1:
        raise SlmembedError("--dims scores prefixes of one model's vectors: give one --adapter")
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
    members = [load_embedder(args.model, adapter, **loading, trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle, **overrides) for adapter in adapters]
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
    if args.dims and max(args.dims) > (size := embedder.encode(["size"]).shape[1]):  # before the long encode
        raise SlmembedError(f"--dims {max(args.dims)} is above the model's embedding size {size}")
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

    recipe = _recipe(args, args.recipe or args.model, args.model if args.recipe else None)
    name = Path(args.output).name
    _check_device(args)
    reproduce(recipe, args.output, args.run_dir or Path("runs/reproduce") / name, data_dir=args.data_dir,
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
    from slmembed.atomic import write_json
    from slmembed.demo import demo  # torch comes once its output is checked and held

    _check_device(args)
    result = demo(args.output, args.recipe, args.set, data_dir=args.data_dir, device=args.device, force=args.force)
    write_json(Path(args.output) / "demo.json", {**result, "run": provenance(args.command_line)})
    outputs.record_added(args.output, "demo.json", "demo")
    return 0


def _load_model(name: str, args: argparse.Namespace):
    """An Embedder for a packaged model name, a model folder, an exported folder or a training run folder, and the
    id it goes by (the name, or the folder's name)."""
    from slmembed.loading import load_embedder

    path = Path(name)
    embedder = load_embedder(name, **_loading(args), trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle)
    _compile(embedder, args)
    return embedder, path.resolve().name if path.is_dir() else name  # "." is served under its folder's name


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
    meta = export(args.adapter, args.output, fmt=args.format, merge=not args.no_merge, dtype=args.dtype,
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

    check = functools.partial(check_output, args.input, args.output, reads=[args.model, args.calibration],
                              force=args.force)
    with outputs.writing(args.output, check):
        _check_calibration(args, args.precision)
        texts = count_texts(args.input, args.column)  # every row checked before the model loads
        embedder, model_id = _load_model(args.model, args)
        calibration = load_calibration(args.calibration, embedder, args.batch_size) if args.calibration else None
        summary = embed_file(embedder, model_id, args.input, args.output, column=args.column,
                             chunk_size=args.chunk_size, batch_size=args.batch_size, force=args.force,
                             precision=args.precision, calibration=calibration, texts=texts)
    print(json.dumps(summary))
    return 0


def _served(args: argparse.Namespace):
    """One model (a name or folder) under its name or --name, or several training runs' adapters over their shared
    base model, each under its folder's name (adapters.py)."""
    from slmembed.adapters import AdapterPool, Single

    if len(args.model) == 1:
        embedder, model_id = _load_model(args.model[0], args)
        return Single(embedder, args.name or model_id)
    names = [Path(m).name for m in args.model]
    for option, value in (("--name", args.name), ("--compile", args.compile), ("--calibration", args.calibration)):
        if value:
            raise SlmembedError(f"{option} applies to a server of one model; several are served under their folders' "
                                "names")
    if len(set(names)) < len(names):
        raise SlmembedError(f"two runs share a folder name ({', '.join(names)}): each adapter is served under its "
                            "folder's name")
    runs = dict(zip(names, map(Path, args.model), strict=True))
    return AdapterPool(runs, max_loaded=args.max_adapters, **_loading(args),
                       trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def cmd_serve(args: argparse.Namespace) -> int:
    from slmembed.endpoint import api_key, listening

    key = api_key(args.api_key)
    _check_calibration(args)
    with listening(args.host, args.port) as sockets:  # bound before the model loads: a taken port fails at once
        from slmembed.serve import Limits, serve

        limits = Limits(max_inputs=args.max_inputs, max_chars=args.max_chars, max_batch=args.max_batch,
                        max_queue=args.max_queue, max_connections=args.max_connections,
                        read_timeout=args.read_timeout, request_timeout=args.request_timeout)
        served = _served(args)
        calibration = None
        if args.calibration:
            from slmembed.embed_file import load_calibration

            calibration = load_calibration(args.calibration, served.embedder(served.names[0]))
        serve(served, sockets, limits=limits, api_key=key, calibration=calibration)
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other user error) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"slmembed: error: {self.prog}: {message} (see {self.prog} --help)\n")


def force(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--force", action="store_true",
                    help=f"replace {what} (only ever what slmembed wrote there)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="slmembed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_safety(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle weights (pytorch_model.bin, .pt), which can run code when loaded")

    def encoding(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bf16 where the device computes it natively, else fp32")
        sp.add_argument("--compile", action="store_true",
                        help="compile the model's blocks first: faster encoding on a GPU after a one-off compile "
                             "of 10-12 s (docs/performance.md); pays for large inputs")

    def common(sp: argparse.ArgumentParser, recipe: bool = False) -> None:
        if recipe:
            sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="override a recipe field, e.g. train.lr=5e-4 (repeatable)")
        sp.add_argument("--data-dir", help="data folder (default: $SLMEMBED_DATA, then ../shared/data)")
        model_safety(sp)

    t = sub.add_parser("train", help="fine-tune a LoRA adapter with a recipe")
    t.add_argument("--config", required=True, help="recipe YAML file or the name of a shipped recipe (e.g. gemma-2b)")
    t.add_argument("--output", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    t.add_argument("--profile", nargs="?", const=(20, 10), type=steps_window, metavar="FIRST:COUNT",
                   help="profile steps FIRST+1..FIRST+COUNT (default 20:10) into the run folder's profile/")
    force(t, "an earlier run in --output")
    common(t, recipe=True)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="Spearman x100 on the STS sets (MTEB conventions)")
    e.add_argument("--model", help="model name, folder or hub id (optional with a run folder as --adapter)")
    e.add_argument("--adapter", action="append",
                   help="training run folder or PEFT adapter folder; repeat it to score the ensemble of several runs "
                        "(the mean of their cosine similarities)")
    e.add_argument("--tasks", nargs="+", help="default: all nine")
    e.add_argument("--output", help="write the scores to this JSON file")
    force(e, "an earlier eval JSON at --output")
    e.add_argument("--pooling", choices=POOLINGS)
    e.add_argument("--prompt", type=template, help="prompt template with {} or P1/P2/P3/PromptEOL/AnglE")
    e.add_argument("--batch-size", type=positive,
                   help="sentences per batch (default: 1024 on a GPU, or any number up to 32,768 tokens where batches "
                        "are packed; 64 on the CPU)")
    e.add_argument("--precision", nargs="+", choices=PRECISIONS, metavar="P",
                   help="also score compact vectors at these precisions (int8, uint8, binary, ubinary): cosine for "
                        "int8/uint8 (ranges from STSBenchmark dev), Hamming for binary/ubinary")
    e.add_argument("--dims", nargs="+", type=positive, metavar="D",
                   help="also score the first D coordinates of each embedding, renormalised (Matryoshka sizes)")
    encoding(e)
    common(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reproduce", help="the paper's experiment: nine STS sets before, train, nine sets after")
    r.add_argument("--model", required=True, help="model; also the shipped recipe's name unless --recipe is given")
    r.add_argument("--recipe", help="recipe YAML or shipped recipe name (default: the recipe named MODEL)")
    r.add_argument("--output", required=True, help="results folder results/reproduce/NAME; files are NAME.*")
    r.add_argument("--run-dir", help="training run folder (default: runs/reproduce/NAME)")
    r.add_argument("--curve", type=count, default=0, help="also score this many evenly spaced checkpoints")
    force(r, "earlier reproduce results in --output and an earlier run in --run-dir")
    common(r, recipe=True)
    r.set_defaults(func=cmd_reproduce)
    for sp in (t, r):
        sp.add_argument("--skip-bad-rows", action="store_true",
                        help="skip malformed training-data rows (counted in data.json) instead of stopping")

    s = sub.add_parser("soup", help="average the weights of several training runs of one recipe (a model soup)")
    s.add_argument("--run", action="append", required=True, help="finished training run folder (two or more)")
    s.add_argument("--output", required=True, help="run folder to write the soup to")
    s.add_argument("--greedy", action="store_true",
                   help="greedy soup: add runs best first while the soup's STSBenchmark dev score does not drop "
                        "(only STSBenchmark dev chooses)")
    s.add_argument("--tasks", nargs="+", help="sets the soup is scored on once chosen (default: all nine)")
    force(s, "an earlier soup in --output")
    common(s)
    s.set_defaults(func=cmd_soup)

    d = sub.add_parser("demo", help="fine-tune an offline model on the CPU; STSBenchmark before/after")
    d.add_argument("--recipe", default="demo-smollm2")
    d.add_argument("--output", default="runs/demo")
    force(d, "an earlier demo run in --output")
    common(d, recipe=True)
    d.set_defaults(func=cmd_demo)

    def loading(sp: argparse.ArgumentParser) -> None:
        model_safety(sp)
        encoding(sp)

    x = sub.add_parser("export", help="a training run as a sentence-transformers (or transformers) model folder")
    x.add_argument("--adapter", required=True, help="training run folder")
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
    x.add_argument("--data-dir", help="data folder (default: $SLMEMBED_DATA, then ../shared/data)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("embed", help="embed a text (one per line), CSV or JSONL file into .npy or .parquet")
    m.add_argument("input", help="input file: .csv, .jsonl/.ndjson, or text with one text a line")
    m.add_argument("--output", required=True, help="OUT.npy or OUT.parquet; chunks go to OUT.parts/ meanwhile")
    m.add_argument("--model", required=True, help="model name or folder, exported folder, or training run folder")
    m.add_argument("--column", help="CSV column or JSONL field holding the text (default: text)")
    m.add_argument("--chunk-size", type=positive, default=4096, help="texts per resumable chunk")
    m.add_argument("--batch-size", type=positive,
                   help="texts per batch (default: 1024 on a GPU, or any number up to 32,768 tokens where batches are "
                        "packed; 64 on the CPU)")
    m.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="compact vectors (sentence-transformers' quantize_embeddings): int8/uint8 [N, D], "
                        "binary/ubinary packed bits [N, D/8]")
    m.add_argument("--calibration", help="int8/uint8 ranges from these embeddings: an earlier float32 .npy output, "
                                         "or a text/CSV/JSONL file of texts (default: the input's own)")
    force(m, "an earlier embed output at --output")
    loading(m)
    m.set_defaults(func=cmd_embed)

    v = sub.add_parser("serve", help="an OpenAI-compatible embeddings API (POST /v1/embeddings)")
    v.add_argument("model", nargs="+",
                   help="model name or folder, exported folder, or training run folder; or several LoRA training "
                        "runs over one base model, each served under its folder's name without merging")
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
    loading(v)
    v.set_defaults(func=cmd_serve)

    o = sub.add_parser("report", help="markdown report with plots of a run, a reproduce result, or an ablation folder")
    o.add_argument("folder", help="training run folder, results/reproduce/NAME, or results/reproduce")
    o.add_argument("--output", help="folder for report.md and the PNGs (default: the folder itself)")
    force(o, "an earlier report.md and its PNGs")
    o.set_defaults(func=cmd_report)
    return p


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
