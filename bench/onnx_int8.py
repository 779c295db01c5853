"""Which products an int8 ONNX export may quantise, chosen on STSBenchmark dev (never a test set).

From a float32 ONNX export (``slmembed export --format onnx``), two int8 graphs by ``onnx_model.quantize_int8``:
every product with a constant weight, and every one but the MLP's down projection (the products taking
``intermediate_size`` inputs). Each is scored on STSBenchmark dev with onnxruntime, beside the float32 graph, with
its encoding rate on this CPU.

    python bench/onnx_int8.py --folder runs/onnx-demo-fp32 --output results/onnx/int8-variants-dev.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import save

from slmembed.data.sts import load_sts
from slmembed.evaluate import evaluate
from slmembed.onnx_model import FILE, OnnxEmbedder, quantize_int8
from slmembed.run import EmbedInfo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="a float32 ONNX export folder")
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    source = Path(args.folder)
    spec = EmbedInfo.read(source).spec
    inner = json.loads((source / "config.json").read_text()).get("intermediate_size")
    sets = {"STSBenchmark-dev": load_sts("STSBenchmark", args.data_dir, split="dev")}
    scratch = Path(tempfile.mkdtemp(prefix="onnx-int8-"))
    results = {}
    for name, skip in (("float32", None), ("int8 every weight product", 0), ("int8 but the down projection", inner)):
        folder = source
        if skip is not None:
            folder = scratch / str(skip)
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(FILE))
            quantize_int8(source / FILE, folder / FILE, skip or None)
        start = time.perf_counter()
        result = evaluate(OnnxEmbedder(folder, spec), sets)
        results[name] = {"stsb_dev": result["average"], "sentences_per_s": round(
            result["sentences"] / (time.perf_counter() - start), 1), "megabytes": round((folder / FILE).stat().st_size
                                                                                         / 2**20, 1)}
        print(name, results[name], flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    save(args.output, {"folder": str(source), "intermediate_size": inner, "results": results})


if __name__ == "__main__":
    main()
