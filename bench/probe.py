"""A hostile-user probe of the slmembed CLI: each case of the probe report run as a new user would run it (real
``python -m slmembed`` processes, real files in a temporary folder, servers on 127.0.0.1 at a free port, bounded
time), against one or more source trees, e.g. the code before the fixes and after:

    python bench/probe.py --src /tmp/old/src --src src --output results/probe.json [--cases 1,5,9]

A case "holds" when the behaviour is what the fix promises (one line ``slmembed: error: ...`` on stderr, the right
exit code, no traceback, nothing of the user's lost or changed, vectors correct) and is "broken" otherwise; a case
this machine cannot set up is "not run". Each result has a one-line reason: exit code, stderr's first line, what was
checked. CPU only, tiny models (a random 2-layer Llama saved here, all-MiniLM-L6-v2), so a tree takes minutes.
Case 12 mounts tmpfs file systems (needs root); without that it is "not run".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

# Where a run keeps what: the names of this tree's run.py, the same in every tree probed.
from slmembed.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Checkpoint, RunDir

PY = sys.executable
DATA = os.environ.get("SLMEMBED_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
CPU = ["--device", "cpu", "--dtype", "float32"]
TINY_RECIPE = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.max_triplets=64",
               "--set", "data.sources=[cad_snli]", "--set", "model.max_length=32"]
TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "The cat sleeps on the mat.",
         "Stocks fell sharply on Monday.", "Two dogs run across a field.", "It is raining in the city."]

# (number, name, class, severity)
CASES = [
    (1, "ST folder with Dense after pooling / LayerNorm", "silently wrong vectors", "high"),
    (2, "embed resumed after the weights changed", "silently wrong vectors", "high"),
    (3, "embed resumed with another --dtype", "silently wrong vectors", "high"),
    (4, "--calibration file is also --output", "inputs overwritten", "high"),
    (5, "serve with an empty API key", "fail-open server", "medium"),
    (6, "two trains into one new folder", "two writers", "medium"),
    (7, "two embeds to one output", "two writers", "medium"),
    (8, "killed export leaves hidden temp folders", "two writers", "medium"),
    (9, "recipe with lr twice", "recipes", "medium"),
    (10, "recipe with train: twice", "recipes", "medium"),
    (11, "empty recipe file", "recipes", "medium"),
    (12, "full disk during train/embed/export", "tracebacks", "medium"),
    (13, "JSONL with a lone surrogate", "tracebacks", "medium"),
    (14, "JSONL nested 100,000 deep", "tracebacks", "medium"),
    (15, "resume with a foreign pickle as optim.pt", "tracebacks", "medium"),
    (16, "serve on a bad host / a taken port", "tracebacks", "medium"),
    (17, "CSV row with an extra comma", "input handling", "medium"),
    (18, "whitespace-only text to the server", "input handling", "medium"),
    (19, "resume a finished run without checkpoints", "input handling", "medium"),
    (20, "report --output RUN/adapter", "input handling", "low"),
    (21, "embed a folder / /dev/null", "input handling", "low"),
    (22, "HEAD /health", "input handling", "low"),
    (23, "serve --name ''", "input handling", "low"),
    (24, "model-free checks answer in < 1 s", "input handling", "low"),
    (25, "export --help and docs agree on the default dtype", "input handling", "low"),
    (26, "adapter/export .safetensors are 0644 under umask 022", "file modes", "low"),
]


class Result(Exception):
    """Raised by a case to give its verdict early."""

    def __init__(self, result: str, reason: str):
        super().__init__(reason)
        self.result, self.reason = result, reason


def held(reason: str):
    raise Result("held", reason)


def broken(reason: str):
    raise Result("broken", reason)


def not_run(reason: str):
    raise Result("not run", reason)


# --- running slmembed ---------------------------------------------------------------------------------------------

class Run:
    """A finished slmembed process."""

    def __init__(self, args, rc, out, err, seconds):
        self.args, self.rc, self.out, self.err, self.seconds = args, rc, out, err, seconds

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.replace("\r", "\n").splitlines() if ln.strip()]

    @property
    def errors(self) -> list[str]:
        """The ``slmembed: error:`` lines (from where they start: a progress bar may precede one on its line)."""
        return [ln[ln.index("slmembed: error:"):] for ln in self.lines if "slmembed: error:" in ln]

    @property
    def glued(self) -> bool:
        """Whether an error line shares its line with a progress bar (no newline between them)."""
        return any("slmembed: error:" in ln and not ln.startswith("slmembed: error:") for ln in self.lines)

    @property
    def first(self) -> str:
        lines = self.err.strip().splitlines()
        return (lines[0] if lines else "")[:220]

    def one_line(self, rc: int | tuple = 2, strict: bool = True) -> bool:
        """Exit ``rc``, no traceback, one ``slmembed: error:`` line (strict: and nothing else on stderr)."""
        rcs = rc if isinstance(rc, tuple) else (rc,)
        ok = self.rc in rcs and "Traceback" not in self.err and len(self.errors) == 1
        return ok and (not strict or len(self.err.strip().splitlines()) == 1)

    def describe(self) -> str:
        tb = "; traceback" if "Traceback" in self.err else ""
        shown = self.errors[0] if self.errors else (self.lines[-1] if self.lines else "")
        return f"exit {self.rc}{tb}: {shown[:200]!r} ({self.seconds:.1f} s)"


class Probe:
    def __init__(self, src: str, root: Path, fixtures: dict):
        self.src, self.root, self.fx = str(Path(src).resolve()), root, fixtures
        self.env = {**os.environ, "PYTHONPATH": self.src, "SLMEMBED_DATA": DATA, "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.env.pop("SLMEMBED_API_KEY", None)
        self._runs = {}
        self.left = []

    def popen(self, args, env=None, **kw) -> subprocess.Popen:
        p = subprocess.Popen([PY, "-m", "slmembed", *map(str, args)], cwd=self.root, env={**self.env, **(env or {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.umask(0o022), **kw)
        p.started = time.perf_counter()
        return p

    def finish(self, p: subprocess.Popen, args, timeout: float = 300) -> Run:
        try:
            out, err = p.communicate(timeout=max(1, timeout - (time.perf_counter() - p.started)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n[probe: killed after {timeout} s]"
        return Run(args, p.returncode, out, err, time.perf_counter() - p.started)

    def slm(self, *args, env=None, timeout: float = 300) -> Run:
        return self.finish(self.popen(args, env=env), args, timeout)

    def train(self, output, *extra, model=None) -> Run:
        return self.slm("train", "--config", "smollm2-135m", "--output", output, "--set",
                        f"model.name={model or self.fx['tiny']}", *TINY_RECIPE, *extra, "--device", "cpu",
                        "--data-dir", DATA)

    def run_folder(self, name: str, *extra) -> Path:
        """A finished tiny training run (made once per name)."""
        if name not in self._runs:
            out = self.root / "runs" / name
            r = self.train(out, *extra)
            if r.rc != 0:
                not_run(f"could not train the tiny run: {r.describe()}")
            self._runs[name] = out
        return self._runs[name]

    def texts(self, name="texts.txt", lines=TEXTS) -> Path:
        path = self.root / name
        path.write_text("".join(t + "\n" for t in lines))
        return path

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@contextlib.contextmanager
def server(probe: Probe, *args, env=None, wait: float = 90):
    """A serve process on a free port; yields (process, base url, None) once /health answers, or (process, url, Run)
    if it exited first. Always stopped afterwards."""
    port = free_port()
    full = ["serve", *args, "--port", port, "--device", "cpu", "--dtype", "float32"]
    p = probe.popen(full, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.perf_counter() + wait
        while time.perf_counter() < end:
            if p.poll() is not None:
                yield p, url, probe.finish(p, full)
                return
            try:
                if http("GET", url + "/health", timeout=2) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield p, url, None
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in (p.stdout, p.stderr):
            f.close()


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (hidden ones too) with its sha256."""
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def wait_for(predicate, p: subprocess.Popen, timeout: float = 120, step: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true (True) or the process ends or time runs out (False)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if predicate():
            return True
        if p.poll() is not None:
            return bool(predicate())
        time.sleep(step)
    return False


# --- fixtures shared by every tree (built with transformers / sentence-transformers, not slmembed) ------------------

def build_fixtures(root: Path, src: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    env = {**os.environ, "PYTHONPATH": src}
    where = subprocess.run([PY, "-c", "from slmembed import models; print(models.resolve('all-minilm-l6-v2')); "
                            "print(models.resolve('smollm2-135m'))"], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    minilm, smollm2 = where
    fx = {"minilm": minilm, "smollm2": smollm2}
    tok = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    tiny = root / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    fx["tiny"] = str(tiny)

    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st

    def pipeline(name: str, *after) -> Path:
        torch.manual_seed(0)
        model = SentenceTransformer(modules=[st.Transformer(minilm), st.Pooling(384, "mean"), *after, st.Normalize()],
                                    device="cpu")
        model.save(str(root / name))
        return root / name

    dense = pipeline("st-dense", st.Dense(384, 128, activation_function=torch.nn.Tanh()))
    fx["st_dense"] = str(dense)
    fx["st_dense_vectors"] = SentenceTransformer(str(dense), device="cpu").encode(TEXTS, convert_to_numpy=True)
    fx["st_layernorm"] = str(pipeline("st-layernorm", st.LayerNorm(384)))
    return fx


# --- the cases ----------------------------------------------------------------------------------------------------

def case_1(p: Probe):
    texts = p.texts()
    out = p.root / "c1" / "v.npy"
    out.parent.mkdir()
    r = p.slm("embed", texts, "--model", p.fx["st_dense"], "--output", out, *CPU)
    notes = []
    ok = r.rc == 0 and out.exists()
    if ok:
        v, ref = np.load(out), p.fx["st_dense_vectors"]
        if v.shape != ref.shape:
            ok = False
            notes.append(f"Dense folder: vectors {v.shape}, sentence-transformers gives {ref.shape}")
        else:
            c = cosines(v.astype(np.float64), ref.astype(np.float64)).min()
            ok = c > 0.999
            notes.append(f"Dense folder: {v.shape[1]}-dim, min cosine to SentenceTransformer.encode {c:.5f}")
    else:
        notes.append(f"Dense folder: {r.describe()}")
    r2 = p.slm("embed", texts, "--model", p.fx["st_layernorm"], "--output", p.root / "c1" / "w.npy", *CPU)
    ln = r2.one_line(2, strict=False) and "LayerNorm" in r2.errors[0]
    notes.append(f"LayerNorm folder: {r2.describe()}" + ("" if ln else " (wanted one line naming LayerNorm)"))
    (held if ok and ln else broken)("; ".join(notes))


def _many(p: Probe, n: int = 600) -> Path:
    """``n`` texts of 20 words."""
    many = p.root / f"many-{n}.txt" if n != 600 else p.root / "many.txt"
    if not many.exists():
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
        rng = np.random.default_rng(0)
        many.write_text("".join(" ".join(rng.choice(words, 20)) + "\n" for _ in range(n)))
    return many


def _killed_embed(p: Probe, name: str, model: Path, dtype: str) -> Path:
    """An embed of 600 texts in chunks of 2, SIGKILLed once its first chunk is on disk; returns the output path."""
    many = _many(p)
    out = p.dir(name) / "out.npy"
    args = ["embed", many, "--model", model, "--output", out, "--chunk-size", 2, "--device", "cpu", "--dtype", dtype]
    proc = p.popen(args)
    first = out.with_name("out.npy.parts") / "00000000.npy"
    caught = wait_for(first.exists, proc) and proc.poll() is None
    proc.kill()
    r = p.finish(proc, args)
    if not caught:
        not_run(f"could not interrupt the first embed after its first chunk ({r.describe()})")
    p.left = sorted(e.name for e in first.parent.iterdir() if not e.name.endswith(".npy") and e.name != "manifest.json")
    return out


def _resume_check(p: Probe, out: Path, args: list, ref_args: list, word: str, label: str):
    """Rerun a killed embed with ``args``: held if refused in one line naming ``word`` and --force then gives the
    reference vectors, or if it gives the reference vectors itself."""
    r = p.slm(*args)
    label += f" (the SIGKILL left {p.left} in the sidecar)" if p.left else ""
    ref_out = out.with_name("ref.npy")
    rr = p.slm(*ref_args, "--output", ref_out, "--chunk-size", 2)  # the same batches as the resumed run
    if rr.rc != 0:
        not_run(f"the reference embed failed: {rr.describe()}")
    ref = np.load(ref_out)
    if r.rc == 0:
        v = np.load(out)
        bad = int((np.abs(v.astype(np.float64) - ref).max(1) > 1e-4).sum())
        (held if bad == 0 else broken)(f"rerun {label} {r.describe()}: {bad} of {len(v)} rows differ from a fresh "
                                       "run" + (" (chunks made before the change were reused)" if bad else ""))
    if not (r.one_line(2, strict=False) and word in r.errors[0].lower()):
        broken(f"rerun {label}: {r.describe()} (wanted one line naming {word})")
    f = p.slm(*args, "--force")
    if f.rc != 0:
        broken(f"refused: {r.errors[0]!r}; but --force: {f.describe()}")
    bad = int((np.abs(np.load(out).astype(np.float64) - ref).max(1) > 1e-4).sum())
    (held if bad == 0 else broken)(f"rerun {label} refused: {r.errors[0]!r}; --force: exit 0, {bad} rows differ from a "
                                   "fresh run")


def case_2(p: Probe):
    from safetensors.numpy import load_file, save_file

    model = p.root / "c2-model"
    shutil.copytree(p.fx["tiny"], model)
    out = _killed_embed(p, "c2", model, "float32")
    weights = load_file(model / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    weights[key] = weights[key] + np.random.default_rng(1).normal(0, 0.2, weights[key].shape).astype(np.float32)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    many = p.root / "many.txt"
    args = ["embed", many, "--model", model, "--output", out, "--chunk-size", 2, "--device", "cpu", "--dtype",
            "float32"]
    _resume_check(p, out, args, ["embed", many, "--model", model, "--device", "cpu", "--dtype", "float32"], "weights",
                  "after a weight changed")


def case_3(p: Probe):
    out = _killed_embed(p, "c3", Path(p.fx["tiny"]), "float32")
    many = p.root / "many.txt"
    args = ["embed", many, "--model", p.fx["tiny"], "--output", out, "--chunk-size", 2, "--device", "cpu",
            "--dtype", "bfloat16"]
    _resume_check(p, out, args, ["embed", many, "--model", p.fx["tiny"], "--device", "cpu", "--dtype", "bfloat16"],
                  "dtype", "with --dtype bfloat16")


def case_4(p: Probe):
    texts = p.texts()
    d = p.dir("c4")
    notes, ok = [], True
    x = d / "X.txt"
    x.write_text("Calibration sentence one.\nCalibration sentence two.\n")
    before = x.read_bytes()
    r = p.slm("embed", texts, "--model", "all-minilm-l6-v2", "--precision", "int8", "--calibration", x, "--output", x,
              "--force", *CPU)
    same = x.read_bytes() == before
    ok &= r.one_line(2) and same
    notes.append(f"X.txt: {r.describe()}, X.txt {'unchanged' if same else 'CHANGED'}")
    xn = d / "X.npy"
    r0 = p.slm("embed", texts, "--model", "all-minilm-l6-v2", "--output", xn, *CPU)
    if r0.rc != 0:
        not_run(f"could not make the float32 .npy: {r0.describe()}")
    before = xn.read_bytes()
    r = p.slm("embed", texts, "--model", "all-minilm-l6-v2", "--precision", "int8", "--calibration", xn, "--output",
              xn, "--force", *CPU)
    same = xn.read_bytes() == before
    ok &= r.one_line(2) and same
    notes.append(f"X.npy: {r.describe()}, X.npy {'unchanged' if same else 'CHANGED'}")
    (held if ok else broken)("; ".join(notes))


def case_5(p: Probe):
    notes, ok = [], True
    for label, args, env in (("--api-key ''", ["all-minilm-l6-v2", "--api-key", ""], None),
                             ("SLMEMBED_API_KEY=", ["all-minilm-l6-v2"], {"SLMEMBED_API_KEY": ""})):
        with server(p, *args, env=env, wait=60) as (proc, url, r):
            if r is None:
                ok = False
                up = "answering /health" if proc.poll() is None else "running"
                open_ = http("POST", url + "/v1/embeddings", {"input": ["x"]}) if proc.poll() is None else None
                notes.append(f"{label}: server started ({up}; POST /v1/embeddings without a key: {open_})")
                continue
            fast = r.seconds < 5
            good = r.one_line(2) and fast
            ok &= good
            notes.append(f"{label}: {r.describe()}" + ("" if fast else " (too slow to be before the model load)"))
    (held if ok else broken)("; ".join(notes))


def case_6(p: Probe):
    out = p.root / "c6" / "run"
    first = p.popen(["train", "--config", "smollm2-135m", "--output", out, "--set", f"model.name={p.fx['tiny']}",
                     *TINY_RECIPE, "--device", "cpu", "--data-dir", DATA])
    time.sleep(0.5)
    second = p.train(out)
    r1 = p.finish(first, ["train"])
    refused = second.one_line(2) and str(first.pid) in second.errors[0]
    run = RunDir(out)
    intact = r1.rc == 0 and run.summary_file.is_file() and (run.adapter / ADAPTER_WEIGHTS).is_file()
    if intact:
        from safetensors.numpy import load_file
        try:
            load_file(run.adapter / ADAPTER_WEIGHTS)
            json.loads(run.summary_file.read_text())
        except Exception as e:  # noqa: BLE001 - any failure to read is a broken run
            intact = False
            r1.err += f" [probe: {e}]"
    why = (f"second: {second.describe()}" + ("" if refused else f" (wanted one line naming PID {first.pid})") +
           f"; first: exit {r1.rc}, run {'intact' if intact else 'NOT intact'}")
    (held if refused and intact else broken)(why)


def case_7(p: Probe):
    texts = _many(p, 200)  # long enough (200 texts in chunks of 2) that the second starts while the first writes
    out = p.dir("c7") / "out.npy"
    args = ["embed", texts, "--model", "all-minilm-l6-v2", "--output", out, "--chunk-size", 2, *CPU]
    first = p.popen(args)
    time.sleep(0.5)
    second = p.slm(*args)
    overlapped = first.poll() is None
    r1 = p.finish(first, args)
    refused = second.one_line(2)
    if refused and not overlapped:
        not_run(f"the first embed ended before the second was refused ({second.describe()}): no overlap to test")
    good = r1.rc == 0 and out.exists() and np.load(out).shape == (200, 384)
    again = p.slm(*args, "--force")
    out.unlink(missing_ok=True)
    normal = p.slm(*args)
    later = again.rc == 0 and normal.rc == 0
    why = (f"second: {second.describe()}; first: exit {r1.rc}" + ("" if good else " (output missing/wrong)") +
           f"; later --force: exit {again.rc}, later plain run: exit {normal.rc}")
    (held if refused and good and later else broken)(why)


def case_8(p: Probe):
    run = p.run_folder("tiny")
    d = p.dir("c8")
    out = d / "exp"
    hidden = lambda: [e.name for e in d.iterdir() if e.name.startswith(".exp")]  # noqa: E731
    args = ["export", "--adapter", run, "--output", out]
    proc = p.popen(args)
    caught = wait_for(lambda: bool(hidden()), proc, step=0.002) and proc.poll() is None
    proc.kill()
    p.finish(proc, args)
    left = hidden()
    if not caught or not left:
        not_run(f"could not kill export while it wrote (caught={caught}, leftovers={left})")
    r = p.slm(*args, *(["--force"] if out.exists() else []))
    after = hidden()
    ok = r.rc == 0 and not after
    (held if ok else broken)(f"killed export left {left}; next export: {r.describe()}; hidden entries after it: "
                             f"{after or 'none'}")


def _recipe_case(p: Probe, name: str, edit, word: str):
    import yaml

    base = Path(p.src) / "slmembed" / "recipes" / "smollm2-135m.yaml"
    recipe = yaml.safe_load(base.read_text())
    recipe["model"].update(name=p.fx["tiny"], max_length=32)
    recipe["train"].update(max_steps=2, batch_size=4)
    recipe["data"].update(sources=["cad_snli"], max_triplets=64)
    path = p.dir(name) / f"{name}.yaml"
    path.write_text(edit(yaml.safe_dump(recipe, sort_keys=False)))
    r = p.slm("train", "--config", path, "--output", p.root / name / "run", "--device", "cpu", "--data-dir", DATA)
    ok = r.one_line(2) and word in r.errors[0]
    (held if ok else broken)(r.describe() + ("" if ok else f" (wanted one line naming {word!r})"))


def case_9(p: Probe):
    _recipe_case(p, "c9", lambda y: y.replace("train:\n", "train:\n  lr: 0.1\n", 1), "lr")


def case_10(p: Probe):
    _recipe_case(p, "c10", lambda y: y + "train:\n  lr: 0.1\n", "train")


def case_11(p: Probe):
    path = p.dir("c11") / "empty.yaml"
    path.write_text("")
    # the tiny recipe as --set overrides, so that a tree which runs the defaults trains for seconds, not hours
    r = p.slm("train", "--config", path, "--output", p.root / "c11" / "run", "--set", f"model.name={p.fx['tiny']}",
              *TINY_RECIPE, "--device", "cpu", "--data-dir", DATA, timeout=120)
    ok = r.one_line(2) and ("empty" in r.errors[0] or "empty.yaml" in r.errors[0])
    (held if ok else broken)(r.describe())


@contextlib.contextmanager
def small_disk(path: Path, free: int, size: int):
    """A tmpfs at ``path`` of ``size`` bytes with only ``free`` bytes free."""
    path.mkdir(parents=True, exist_ok=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        not_run(f"cannot mount a tmpfs here ({m.stderr.strip()[:120]}); the unit tests cover it by injection")
    try:
        with open(path / ".filler", "wb") as f:
            f.truncate(0)
            if size > free:
                os.posix_fallocate(f.fileno(), 0, size - free)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _disk_full_ok(r: Run) -> bool:
    return (r.rc in (1, 2) and "Traceback" not in r.err and len(r.errors) == 1
            and "no space left on device" in r.errors[0].lower())


def case_12(p: Probe):
    from safetensors.numpy import load_file

    notes, ok = [], True
    page = 4096
    # train: 4 steps, a checkpoint each step (2 kept, 11 pages each): 34 free pages fill while the third is written
    with small_disk(p.root / "c12-train", 34 * page, 1 << 20) as disk:
        run = disk / "run"
        r = p.train(run, "--set", "train.max_steps=4", "--set", "train.save_every=1", "--set",
                    "train.keep_checkpoints=2")
        kept = RunDir(run).checkpoints()
        ckpt_ok = bool(kept)
        for c in kept[-1:]:
            try:
                json.loads(Checkpoint(c).state.read_text())
                load_file(next(c.glob("*.safetensors")))
            except Exception:  # noqa: BLE001
                ckpt_ok = False
        adapter = RunDir(run).adapter
        adapter_ok = True
        if adapter.exists():
            try:
                load_file(adapter / ADAPTER_WEIGHTS)
                json.loads((adapter / ADAPTER_CONFIG).read_text())
            except Exception:  # noqa: BLE001
                adapter_ok = False
        good = _disk_full_ok(r) and ckpt_ok and adapter_ok
        ok &= good
        notes.append(f"train: {r.describe()}, last checkpoint {kept[-1].name if kept else None} "
                     f"{'readable' if ckpt_ok else 'MISSING/unreadable'}, adapter "
                     f"{'absent or whole' if adapter_ok else 'HALF-WRITTEN'}")
    # embed: 6 texts in chunks of 2 (a page each, and a page or two while each is written) with 5 pages free
    texts = p.texts()
    with small_disk(p.root / "c12-embed", 5 * page, 1 << 20) as disk:
        r = p.slm("embed", texts, "--model", "all-minilm-l6-v2", "--output", disk / "v.npy", "--chunk-size", 2, *CPU)
        good = _disk_full_ok(r)
        ok &= good
        glued = " (the error line follows the progress bar on its line)" if r.glued else ""
        notes.append(f"embed: {r.describe()}{glued}")
    # export: the tiny model's folder is ~16 MB; 8 MB of disk
    run = p.run_folder("tiny")
    with small_disk(p.root / "c12-export", 8 << 20, 8 << 20) as disk:
        r = p.slm("export", "--adapter", run, "--output", disk / "exp")
        good = _disk_full_ok(r)
        ok &= good
        notes.append(f"export: {r.describe()}")
    (held if ok else broken)("; ".join(notes))


def _embed_refusal(p: Probe, name: str, content: str, suffix: str, want: list[str], extra=()):
    d = p.dir(name)
    path = d / f"in{suffix}"
    path.write_text(content)
    out = d / "v.npy"
    r = p.slm("embed", path, "--model", "all-minilm-l6-v2", "--output", out, *extra, *CPU)
    left = [e.name for e in d.iterdir() if e.name != path.name]
    ok = r.one_line(2) and all(w in r.errors[0] for w in want) and not left
    (held if ok else broken)(r.describe() + (f"; left behind: {left}" if left else "") +
                             ("" if all(w in r.first for w in want) else f" (wanted one line naming {' '.join(want)})"))


def case_13(p: Probe):
    content = '{"text": "fine"}\n{"text": "\\ud800"}\n{"text": "also fine"}\n'
    _embed_refusal(p, "c13", content, ".jsonl", ["in.jsonl", "2"])


def case_14(p: Probe):
    depth = 100_000
    content = '{"text": "fine"}\n' + '{"text": ' + "[" * depth + "]" * depth + "}\n"
    _embed_refusal(p, "c14", content, ".jsonl", ["in.jsonl"])


def case_15(p: Probe):
    run = p.root / "c15" / "run"
    extra = ["--set", "train.save_every=1", "--set", "train.max_steps=16"]
    args = ["train", "--config", "smollm2-135m", "--output", run, "--set", f"model.name={p.fx['tiny']}",
            *TINY_RECIPE, *extra, "--device", "cpu", "--data-dir", DATA]
    proc = p.popen(args)  # killed once its second checkpoint is on disk: an unfinished run to --resume
    caught = wait_for(lambda: Checkpoint(RunDir(run).checkpoint(2)).state.exists(), proc, timeout=200)
    proc.kill()
    r = p.finish(proc, args)
    ckpts = RunDir(run).checkpoints()
    if not caught or not ckpts or RunDir(run).summary_file.exists():
        not_run(f"could not kill a run after its checkpoints: {r.describe()}, checkpoints {[c.name for c in ckpts]}")
    import collections

    class Foreign(collections.OrderedDict):
        pass

    Foreign.__module__, Foreign.__qualname__ = "probe_foreign", "Foreign"  # a class weights_only has never heard of
    optim = ckpts[-1] / "optim.pt"
    import types
    sys.modules["probe_foreign"] = types.ModuleType("probe_foreign")
    sys.modules["probe_foreign"].Foreign = Foreign
    import torch
    torch.save({"optimizer": Foreign(x=1), "scheduler": {}}, optim)
    r = p.train(run, *extra, "--resume")
    ok = r.one_line(2, strict=False) and "optim.pt" in r.errors[0]
    (held if ok else broken)(r.describe() + ("" if ok else " (wanted one line naming optim.pt)"))


def case_16(p: Probe):
    notes, ok = [], True
    r = p.slm("serve", "all-minilm-l6-v2", "--host", "no-such-host.invalid", "--port", free_port(), *CPU, timeout=60)
    good = r.one_line(2) and r.seconds < 5
    ok &= good
    notes.append(f"bad host: {r.describe()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = p.slm("serve", "all-minilm-l6-v2", "--port", port, *CPU, timeout=60)
    good = r.one_line(2) and r.seconds < 5
    ok &= good
    notes.append(f"taken port: {r.describe()}")
    (held if ok else broken)("; ".join(notes))


def case_17(p: Probe):
    content = "id,text\n1,A man is playing a guitar.\n2,Hello, world\n3,The cat sleeps.\n"
    _embed_refusal(p, "c17", content, ".csv", ["in.csv", "3"])


def _served(p: Probe) -> dict:
    """One all-MiniLM server for cases 18 and 22 (started once)."""
    if "served" not in p._runs:
        results = {}
        with server(p, "all-minilm-l6-v2") as (proc, url, r):
            if r is not None or proc.poll() is not None:
                results["error"] = r.describe() if r else "server did not come up"
            else:
                results["blank"] = http("POST", url + "/v1/embeddings", {"input": "   ", "model": "all-minilm-l6-v2"})
                results["blank_list"] = http("POST", url + "/v1/embeddings",
                                             {"input": ["ok", " \t "], "model": "all-minilm-l6-v2"})
                try:
                    results["head"] = http("HEAD", url + "/health")
                except OSError as e:
                    results["head"] = f"{type(e).__name__}: {e}"
                results["get"] = http("GET", url + "/health")
        p._runs["served"] = results
    return p._runs["served"]


def case_18(p: Probe):
    s = _served(p)
    if "error" in s:
        not_run(f"server: {s['error']}")
    ok = s["blank"] == 400 and s["blank_list"] == 400
    (held if ok else broken)(f"POST input '   ': {s['blank']}; input ['ok', ' \\t ']: {s['blank_list']}")


def case_19(p: Probe):
    run = p.root / "c19" / "run"
    r = p.train(run)
    if r.rc != 0:
        not_run(f"could not train: {r.describe()}")
    shutil.rmtree(RunDir(run).checkpoints_dir, ignore_errors=True)
    rep = p.slm("report", run)
    if not (run / "report.md").exists():
        not_run(f"report failed: {rep.describe()}")
    before = snapshot(run)
    r = p.train(run, "--resume")
    after = snapshot(run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    ok = r.one_line(2) and not changed
    (held if ok else broken)(f"{r.describe()}; changed in the run: {changed[:6] or 'nothing'}")


def case_20(p: Probe):
    run = p.run_folder("tiny")
    adapter = RunDir(run).adapter
    before = snapshot(adapter)
    r = p.slm("report", run, "--output", adapter)
    after = snapshot(adapter)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    for k in changed:  # leave the shared run as it was for later cases
        if k not in before:
            path = adapter / k
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    ok = r.one_line(2) and not changed
    (held if ok else broken)(f"{r.describe()}; adapter folder changes: {changed or 'none'}")


def case_21(p: Probe):
    d = p.dir("c21")
    folder = p.dir("c21/in")
    notes, ok = [], True
    for label, path, words in (("folder", folder, ("folder", "directory")),
                               ("/dev/null", "/dev/null", ("not a regular file",))):
        r = p.slm("embed", path, "--model", "all-minilm-l6-v2", "--output", d / f"v{len(notes)}.npy", *CPU)
        good = r.one_line(2) and any(w in r.errors[0] for w in words)
        ok &= good
        notes.append(f"{label}: {r.describe()}" + ("" if good else f" (wanted one line saying {words[0]})"))
    (held if ok else broken)("; ".join(notes))


def case_22(p: Probe):
    s = _served(p)
    if "error" in s:
        not_run(f"server: {s['error']}")
    (held if s["head"] == 200 else broken)(f"HEAD /health: {s['head']} (GET: {s['get']})")


def case_23(p: Probe):
    with server(p, "all-minilm-l6-v2", "--name", "", wait=40) as (proc, url, r):
        if r is None:
            broken("the server started under an empty name")
    (held if r.one_line(2) else broken)(r.describe())


def case_24(p: Probe):
    run = p.run_folder("tiny")
    notes, ok = [], True
    for label, args in (("train --set train.lr=-1", ["train", "--config", "smollm2-135m", "--output",
                                                     p.root / "c24" / "x", "--set", "train.lr=-1"]),
                        ("export --output RUN", ["export", "--adapter", run, "--output", run])):
        before = snapshot(run)
        r = p.slm(*args, timeout=120)
        good = r.one_line(2) and r.seconds < 1 and snapshot(run) == before
        ok &= good
        notes.append(f"{label}: {r.describe()}")
    (held if ok else broken)("; ".join(notes))


def case_25(p: Probe):
    import re

    r = p.slm("export", "--help")
    text = " ".join(r.out.split())
    m = re.search(r"--dtype \{[^}]*\}\s+(.*?)(?= --[a-z]|$)", text)
    help_default = re.search(r"default:?\s*`?([a-z0-9]+)", m.group(1)) if m else None
    if not help_default:
        broken(f"export --help names no default for --dtype: {m.group(1)[:150] if m else text[:150]!r}")
    dtype = help_default.group(1)
    tree = Path(p.src).parent
    said = []
    for doc in ("docs/export.md", "README.md"):
        path = tree / doc
        if path.exists():
            for para in re.split(r"\n\s*\n", path.read_text()):
                if "--dtype" in para and "default" in para:
                    flat = " ".join(para.split())
                    said += [(doc, d.group(1)) for d in re.finditer(r"default(?: is| dtype is|:)?\s*`?([a-z0-9]+)`?",
                                                                    flat) if d.group(1) in
                             ("float32", "bfloat16", "float16", "auto")]
    docs = sorted(set(said))
    ok = bool(docs) and all(d == dtype for _, d in docs)
    (held if ok else broken)(f"export --help: default {dtype}; docs: {docs or 'no --dtype default found'}")


def case_26(p: Probe):
    run = p.run_folder("tiny")
    out = p.dir("c26") / "exp"
    r = p.slm("export", "--adapter", run, "--output", out)
    if r.rc != 0:
        not_run(f"export failed: {r.describe()}")
    files = sorted(list(RunDir(run).adapter.glob("*.safetensors")) + list(out.rglob("*.safetensors")))
    modes = {str(f.relative_to(p.root)): oct(f.stat().st_mode & 0o777) for f in files}
    ok = bool(files) and all(m == "0o644" for m in modes.values())
    (held if ok else broken)(f"modes under umask 022: {modes}")


# --- driver -------------------------------------------------------------------------------------------------------

def probe_tree(src: str, fixtures: dict, only: set[int] | None, workdir: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    p = Probe(src, root, fixtures)
    results = {}
    started = time.perf_counter()
    for number, name, cls, severity in CASES:
        if only and number not in only:
            continue
        t = time.perf_counter()
        try:
            globals()[f"case_{number}"](p)
            result, reason = "broken", "the case gave no verdict"
        except Result as r:
            result, reason = r.result, r.reason
        except Exception as e:  # noqa: BLE001 - a probe bug is recorded, not fatal
            result, reason = "not run", f"probe error: {type(e).__name__}: {e}"
        seconds = time.perf_counter() - t
        results[str(number)] = {"case": number, "name": name, "class": cls, "severity": severity, "result": result,
                                "reason": " ".join(reason.split()), "seconds": round(seconds, 1)}
        print(f"[{Path(src).parent.name or src}] {number:2d} {result:7s} {seconds:5.1f}s  {reason[:300]}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return {"src": p.src, "seconds": round(time.perf_counter() - started, 1), "cases": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", required=True, help="a source tree (its src/ folder); repeatable")
    ap.add_argument("--output", required=True, help="JSON file for the results")
    ap.add_argument("--cases", help="comma-separated case numbers (default: all)")
    ap.add_argument("--workdir", default=None, help="where the temporary folders go (default: the system's)")
    args = ap.parse_args()
    only = {int(c) for c in args.cases.split(",")} if args.cases else None
    workdir = Path(args.workdir or tempfile.gettempdir())
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="probe-fixtures-", dir=workdir) as fx_root:
        fixtures = build_fixtures(Path(fx_root), args.src[-1])
        trees = [probe_tree(src, fixtures, only, workdir) for src in args.src]
    head = f"{'case':<56} {'class':<24} {'sev':<7}" + "".join(f" {Path(t['src']).parent.name[:14]:<15}"
                                                              for t in trees)
    print("\n" + head)
    counts = {}
    for number, name, cls, severity in CASES:
        if only and number not in only:
            continue
        row = f"{f'{number}. {name}':<56} {cls:<24} {severity:<7}"
        for t in trees:
            res = t["cases"][str(number)]["result"]
            row += f" {res:<15}"
            c = counts.setdefault(t["src"], {}).setdefault(severity, {"tried": 0, "held": 0, "broken": 0,
                                                                      "not run": 0})
            c["tried" if res != "not run" else "not run"] += 1
            if res != "not run":
                c[res] += 1
        print(row)
    for src, by in counts.items():
        print(f"{src}: " + "; ".join(f"{sev}: {c['tried']} tried, {c['held']} held, {c['broken']} broken"
                                     + (f", {c['not run']} not run" if c["not run"] else "")
                                     for sev, c in by.items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "trees": trees, "counts": counts},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
