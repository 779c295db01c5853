"""A training run as a model folder that other tools load: sentence-transformers (default) or plain transformers.

* ``st``: Transformer -> Pooling (last token, mean or CLS, as trained) -> Normalize, written by sentence-transformers
  itself, with the run's prompt (the text before ``{}``) as the model's default prompt.
* ``hf``: a transformers folder (``AutoModel.from_pretrained(OUT)``).
* ``onnx``: ``model.onnx`` (onnx_model.py: backbone, pooling and normalisation in one graph, optionally int8) with
  the export tokenizer. A quality gate: the export scores the STS sets with onnxruntime and with the PyTorch model it
  came from, on the same CPU, and refuses to finish (nothing is written) when the average drops by more than
  ``max_drop`` (default 0.2 points for float32, 1.0 for int8) unless ``accept_drop``; the scores, the drop and both
  encoding speeds go into ``eval.json`` and the model card.

The LoRA adapter is merged into the base weights (safetensors) unless ``merge=False``, which keeps the PEFT adapter
(its ``base_model_name_or_path`` points at the base model's local folder or hub id). The exported tokenizer appends
EOS itself (its post-processor) and pads on the right, so ``SentenceTransformer(OUT).encode`` feeds the model the
very token ids of slmembed's ``Embedder.tokenize``; the export checks this before it is renamed into place.
Its saved spec (run.EmbedInfo) tells slmembed how to load the folder back, and ``README.md`` is a model card with the
STS scores.

A run trained with bidirectional attention (attention.py) is saved with the config flags that make it so
(``is_causal: false``; Gemma's ``use_bidirectional_attention: true``, for Gemma-3 alone): plain
``AutoModel.from_pretrained`` and sentence-transformers load merged exports bidirectional, without remote code,
unpadded inputs (one text alone) included, which the export checks before it is renamed into place. An adapter
(``merge=False``) is loaded over the base model's own, causal config.json: sentence-transformers (and transformers'
own adapter loading) take no config override for it, so such an export is refused in the ``st`` format, and in the
``hf`` format the model card names the keywords the base model must be loaded with (slmembed applies them itself).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from slmembed import outputs
from slmembed.atomic import atomic_dir
from slmembed.errors import SlmembedError
from slmembed.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EmbedInfo, RunDir
from slmembed.spec import EmbedSpec

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedTokenizerBase

    from slmembed.embedder import Embedder

# torch, transformers and the modules built on them are imported by the functions that use them, so that `export`
# checks its arguments and output in a fraction of a second before any of them loads.

FORMATS = ("st", "hf", "onnx")
MAX_DROP = {None: 0.2, "int8": 1.0}  # the ONNX gate's default margin (nine-set average points) per quantisation
DTYPES = ("float32", "bfloat16", "float16")  # --dtype besides auto, as torch names them
# Texts whose token ids the export compares with the Embedder's: short, punctuated, and one past max_length.
PROBES = ["A man is playing a guitar.", "Hi", "Zwei Hunde rennen über die Wiese!", "word " * 400]


def _append_eos_json(post: dict | None, eos: str, eos_id: int) -> dict:
    """A tokenizers post-processor (JSON) that does what ``post`` does and then appends ``eos`` to each sequence."""
    seq = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    fresh = {"type": "TemplateProcessing", "single": seq[:1], "pair": seq, "special_tokens": {}}
    if post is None:
        template = fresh
    elif post["type"] == "TemplateProcessing":
        template = post
    else:  # e.g. ByteLevel offset trimming: keep it and add a template after it (one template per chain)
        chain = post["processors"] if post["type"] == "Sequence" else [post]
        template = next((p for p in chain if p["type"] == "TemplateProcessing"), None)
        if template is None:
            template = fresh
            chain.append(fresh)
        post = post if post["type"] == "Sequence" else {"type": "Sequence", "processors": chain}
    for key in ("single", "pair"):
        items = []
        for item in template[key]:
            items.append(item)
            if "Sequence" in item:
                items.append({"SpecialToken": {"id": eos, "type_id": item["Sequence"]["type_id"]}})
        template[key] = items
    template["special_tokens"][eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    return template if post is None or post["type"] == "TemplateProcessing" else post


def export_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: EmbedSpec) -> None:
    """Make ``tokenizer`` append EOS (when the spec does), pad on the right and truncate at ``spec.max_length``."""
    from tokenizers import Tokenizer

    from slmembed import models

    if spec.append_eos:
        if not tokenizer.is_fast:
            raise SlmembedError("export needs a fast (tokenizers) tokenizer to append EOS on its own")
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend["post_processor"] = _append_eos_json(backend["post_processor"], tokenizer.eos_token,
                                                     tokenizer.eos_token_id)
        tokenizer.backend_tokenizer.post_processor = Tokenizer.from_str(json.dumps(backend)).post_processor
        # Flags like these make transformers rebuild the post-processor on load, dropping the appended EOS.
        for flag in ("add_bos_token", "add_eos_token"):
            tokenizer.init_kwargs.pop(flag, None)
    models.give_pad_token(tokenizer)  # sentence-transformers pads its batches
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right"
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = spec.max_length


def check_token_ids(folder: Path, reference: Embedder) -> None:
    """Raise unless the folder's tokenizer, given the prompted texts, gives ``reference.tokenize``'s token ids (the
    texts it does not cut, where the template has a tail: a plain tokenizer call cuts that tail off)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    got = tokenizer([reference.spec.template.format(t) for t in PROBES], truncation=True)["input_ids"]
    want = reference.tokenize(PROBES)
    for text, a, b in zip(PROBES, got, want, strict=True):
        if a != b and not (reference.tail and len(b) == reference.spec.max_length):
            raise SlmembedError(f"exported tokenizer gives {a[:8]}... for {text[:30]!r}, slmembed gives {b[:8]}...: "
                                "this tokenizer cannot be made to append EOS on its own")


def chat_template(tokenizer: PreTrainedTokenizerBase, spec: EmbedSpec) -> str:
    """A chat template that renders one text as slmembed tokenises it: the prompt template around it, with the BOS
    the tokenizer adds and the spec's EOS written out, since sentence-transformers tokenises a chat template's render
    without adding special tokens. It refuses anything but one message, e.g. sentence-transformers' ``prompt=``,
    which would arrive as a system message."""
    bare = tokenizer("0", add_special_tokens=False)["input_ids"]
    full = tokenizer("0", add_special_tokens=True)["input_ids"]
    start = full.index(bare[0]) if bare and bare[0] in full else -1
    lead = full[:start]
    if start < 0 or full[start:start + len(bare)] != bare or lead not in ([], [tokenizer.bos_token_id]):
        raise SlmembedError(f"{tokenizer.name_or_path}: its tokenizer adds {full} around {bare}; a chat template for "
                            "sentence-transformers can write out a leading BOS only: export with --format hf")
    prefix, suffix = spec.parts
    text = " + ".join([*(["bos_token"] if lead else []), json.dumps(prefix, ensure_ascii=False),
                       "messages[0]['content']", json.dumps(suffix, ensure_ascii=False),
                       *(["eos_token"] if spec.append_eos else [])])
    refusal = json.dumps("one text a call: this model's prompt template is its chat template")
    return f"{{%- if messages|length != 1 %}}{{{{ raise_exception({refusal}) }}}}{{%- endif %}}{{{{ {text} }}}}"


def check_bidirectional(folder: Path, reference: Embedder) -> None:
    """Raise unless plain ``AutoModel.from_pretrained(folder)`` (as sentence-transformers loads it: SDPA, no remote
    code) is bidirectional on an unpadded text: its first token must see a change of the last one."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(reference.tokenize(PROBES[:1]))
    changed = ids.clone()
    changed[0, -2] = ids[0, 0] if ids[0, -2] != ids[0, 0] else ids[0, 1]  # the EOS (last) stays
    with torch.no_grad():
        first = [model(input_ids=x).last_hidden_state[0, 0] for x in (ids, changed)]
    if torch.equal(*first):
        raise SlmembedError(f"{model.config.model_type}: transformers loads this export with causal attention "
                            "although the run trained bidirectional: its config flags do not reach the attention "
                            "of this architecture (attention.py); use slmembed's own loading")


def _attention_card(spec: EmbedSpec, base: str, merge: bool) -> list[str]:
    """The model card's paragraph on bidirectional attention: where it is set, and what loads it so."""
    from transformers import AutoConfig

    from slmembed import attention, models

    if spec.attention != "bidirectional":
        return []
    if merge:
        return ["", "Attention: bidirectional (every token sees the whole text), trained so from the causal base "
                "model. config.json says so (`is_causal: false`, or Gemma's `use_bidirectional_attention: true`): "
                "transformers >= 5.2 and sentence-transformers load it bidirectional without remote code; older "
                "transformers releases ignore the flag and would run it causally."]
    flags = attention.bidirectional_config(AutoConfig.from_pretrained(models.resolve(base)))
    settings = "; ".join(f"config.{k} = {v!r}" for k, v in flags.items())
    return ["", "Attention: bidirectional (every token sees the whole text), trained so from the causal base model. "
            "This folder is a PEFT adapter, and the base model's own config.json is causal: load the base model with "
            f"its config changed, `config = AutoConfig.from_pretrained(base); {settings}; "
            "model = AutoModel.from_pretrained(base, config=config)`, then attach the adapter "
            "(`PeftModel.from_pretrained(model, folder)`). Loading this folder directly gives a causal model with "
            "wrong embeddings. slmembed (`load_embedder(None, adapter=folder)`) does this itself."]


def read_scores(path: Path) -> dict:
    """STS scores from an ``eval`` JSON ({scores, average}) or a ``reproduce`` JSON ({before, after})."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlmembedError(f"{path}: cannot read scores: {exc}") from exc
    if "after" in data and "scores" in data.get("after", {}):
        return {"before": data["before"], "after": data["after"], "source": str(path)}
    if "scores" in data:
        return {"after": data, "source": str(path)}
    raise SlmembedError(f"{path}: expected an eval JSON with 'scores' or a reproduce JSON with 'before'/'after'")


def _table(scores: dict) -> str:
    cols = [k for k in ("before", "after") if k in scores]
    tasks = list(scores["after"]["scores"])
    lines = ["| task | " + " | ".join("base model" if c == "before" else "this model" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{scores[c]['scores'][task]:.2f}" for c in cols) + " |")
    lines.append("| **average** | " + " | ".join(f"**{scores[c]['average']:.2f}**" for c in cols) + " |")
    return "\n".join(lines)


def _gate_card(gate: dict) -> str:
    """The ONNX export's check, for its model card."""
    rows = [f"| {task} | {gate['pytorch']['scores'][task]:.2f} | {gate['onnx']['scores'][task]:.2f} |"
            for task in gate["onnx"]["scores"]]
    verdict = ("within" if gate["drop"] <= gate["max_drop"] else "**above** (exported with --accept-drop)")
    return "\n".join([
        f"Spearman x100 of cosine similarity, MTEB conventions, scored by the export itself on the same CPU: the "
        f"PyTorch model it came from and this ONNX graph{' (int8)' if gate['quantize'] else ''} run by onnxruntime.",
        "", "| task | PyTorch | ONNX |", "|---|---:|---:|", *rows,
        f"| **average** | **{gate['pytorch']['average']:.2f}** | **{gate['onnx']['average']:.2f}** |", "",
        f"Drop: {gate['drop']:.2f} points, {verdict} the export's margin of {gate['max_drop']}. Encoding the "
        f"{gate['sentences']} sentences: {gate['pytorch']['sentences_per_s']:.1f} sentences/s with PyTorch, "
        f"{gate['onnx']['sentences_per_s']:.1f} with onnxruntime ({gate['threads']} CPU threads)."])


def model_card(name: str, base: str, spec: EmbedSpec, fmt: str, merge: bool, run: RunDir,
               scores: dict | None, gate: dict | None = None) -> str:
    """README.md for the exported folder: what it is, how to load it, how it was trained, and its STS scores."""
    from slmembed import models, pooling

    hub_id = models.PACKAGED[base].hub_id if base in models.PACKAGED else base
    on_hub = hub_id.count("/") == 1 and not Path(hub_id).exists()
    about = f"[{hub_id}](https://huggingface.co/{hub_id})" if on_hub else f"`{hub_id}`"
    recipe, summary = run.recipe(), run.summary()
    prefix, suffix = spec.parts
    full = run.finetune == "full"
    tags = ["slmembed", "sentence-similarity", "feature-extraction", *([] if full else ["lora"])]
    library = {"st": "sentence-transformers", "hf": "transformers", "onnx": "onnx"}[fmt]
    meta = {"library_name": library,
            "pipeline_tag": "sentence-similarity", **({"base_model": hub_id} if on_hub else {}), "tags": tags}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{about} turned into a sentence-embedding model by contrastive "
             f"fine-tuning with slmembed ({'every weight' if full else 'LoRA'}, InfoNCE over in-batch and hard "
             "negatives on NLI triplets)" + ("." if full else ", with the LoRA weights merged into the model." if merge
                                             else ", kept as a PEFT adapter."),
             "", f"Embedding: {pooling.PHRASES[spec.pooling]}, L2-normalised; inputs are truncated to "
             f"{spec.max_length} tokens."]
    if prefix or suffix:
        how = {"st": " (the tokenizer's chat template, which sentence-transformers applies to every text)." if suffix
               else " (the model's default prompt).", "hf": "; apply it yourself.", "onnx": "; apply it yourself."}
        lines.append(f"Each text is wrapped in the prompt `{spec.template}`" + how[fmt])
    lines += _attention_card(spec, base, merge)
    lines += ["", "## Use", ""]
    if fmt == "st":
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  f'model = SentenceTransformer("{name}")',
                  'vectors = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
                  "print(model.similarity(vectors[:1], vectors[1:]))", "```"]
    elif fmt == "onnx":
        lines += ["```python", "import onnxruntime", "from transformers import AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # appends EOS, pads on the right',
                  f'session = onnxruntime.InferenceSession("{name}/model.onnx")',
                  'batch = tokenizer(["A man is playing a guitar."], padding=True, truncation=True, '
                  'return_tensors="np")',
                  'vectors = session.run(None, {"input_ids": batch["input_ids"], '
                  '"attention_mask": batch["attention_mask"]})[0]  # L2-normalised', "```",
                  "", f"or `slmembed eval --model {name}` (also `embed`, `serve`)."]
    else:
        lines += ["```python", "from transformers import AutoModel, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # appends EOS, pads on the right',
                  f'model = AutoModel.from_pretrained("{name}")', "```",
                  "", f"then pool as above; or `slmembed serve {name}`."]
    if recipe:
        lora, train = recipe.lora, recipe.train
        tuned = ("every weight" if full else f"LoRA r={lora.r}, alpha={lora.alpha}, dropout "
                 f"{lora.dropout} on {', '.join(lora.targets)}")
        lines += ["", "## Training", "",
                  f"{tuned}; lr {train.lr} ({train.schedule}, {train.warmup_steps} "
                  f"warm-up steps), temperature {train.temperature}, "
                  + ("hard negatives" if train.hard_negatives else "in-batch negatives only")
                  + (f"; {summary['steps']} steps of {summary['batch_size']} triplets on {summary['device']} in "
                     f"{summary['minutes']:.1f} min." if summary else ".")]
    lines += ["", "## STS scores", ""]
    if gate:
        lines += [_gate_card(gate)]
    elif scores:
        lines += ["Spearman x100 of cosine similarity, MTEB conventions (slmembed's evaluator).", "",
                  _table(scores), "", f"Source: `{scores['source']}`."]
    else:
        lines.append("Not evaluated: export with `--eval`, or pass `--scores` an eval or reproduce JSON.")
    return "\n".join(lines) + "\n"


def _out_dtype(base: str, dtype: str) -> torch.dtype:
    """``auto``: the dtype the base model's weights are stored in (models.stored_dtype)."""
    import torch

    from slmembed import models

    if dtype == "auto":
        return models.stored_dtype(base)
    return getattr(torch, dtype) if dtype in DTYPES else torch.float32


def _write_transformers(run: RunDir, folder: Path, base: str, spec: EmbedSpec, merge: bool,
                        dtype: torch.dtype) -> Embedder:
    """The merged model (or the adapter) and the export tokenizer into ``folder``; returns the run's Embedder."""
    import torch
    from transformers import AutoTokenizer

    from slmembed import models
    from slmembed.loading import load_embedder

    reference = load_embedder(None, adapter=run.path, device=torch.device("cpu"), dtype=torch.float32)
    if merge:
        reference.model.to(dtype).save_pretrained(folder, safe_serialization=True)
    else:
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy(run.adapter / f, folder / f)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = models.resolve(base)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(base))
    export_tokenizer(tokenizer, spec)
    tokenizer.save_pretrained(folder)
    return reference


def _write_sentence_transformers(staging: Path, folder: Path, spec: EmbedSpec, dtype: torch.dtype,
                                 adapter_base: str | None, reference: Embedder) -> None:
    """Build Transformer -> Pooling -> Normalize from the transformers folder ``staging`` and save it to ``folder``.

    ``adapter_base``: ``staging`` holds a PEFT adapter (and the tokenizer) over this base model folder or hub id. A
    prompt template with text after ``{}`` is written as the tokenizer's chat template, through which
    sentence-transformers runs every text (its "message" modality, which also keeps the template's tail on a cut
    text, as slmembed does); a prefix alone is the model's default prompt. Either way sentence-transformers'
    own preprocessing of the saved folder must give ``reference``'s token ids.
    """
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer

    from slmembed import pooling

    prefix, suffix = spec.parts
    text = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    # Text only, unless the template needs the chat template: with "message", every text goes through it.
    modalities = {**text, "message": {**text["text"], "format": "flat"}} if suffix else text
    transformer = Transformer(adapter_base or str(staging), max_seq_length=spec.max_length,
                              model_kwargs={"dtype": dtype}, modality_config=modalities,
                              module_output_name="token_embeddings")
    if adapter_base:
        # The adapter is attached and saved by peft itself: transformers' own adapter saving ties the two libraries'
        # versions together (transformers 5.24 refuses to save an adapter with peft < 0.22). The module saves
        # (Transformer.save) its model and its processor, here the export tokenizer.
        transformer.model = PeftModel.from_pretrained(transformer.model, str(staging))
        transformer.processor = AutoTokenizer.from_pretrained(staging)
    if suffix:
        transformer.processor.chat_template = chat_template(transformer.processor, spec)
    default = {"prompts": {"default": prefix}, "default_prompt_name": "default"} if prefix and not suffix else {}
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling.TO_ST[spec.pooling]), Normalize()],
        device="cpu", similarity_fn_name="cosine", **default)
    model.save(str(folder), create_model_card=False)
    transformer.processor = AutoTokenizer.from_pretrained(folder)  # as saved
    for text, a, b in zip(PROBES, st_token_ids(model, PROBES), reference.tokenize(PROBES), strict=True):
        if a != b:
            raise SlmembedError(f"sentence-transformers tokenises {text[:30]!r} as {a[:8]}...{a[-4:]}, slmembed as "
                                f"{b[:8]}...{b[-4:]}: export with --format hf")


def st_token_ids(model: SentenceTransformer, texts: list[str]) -> list[list[int]]:
    """The token ids sentence-transformers' own preprocessing gives ``texts`` for the SentenceTransformer ``model``,
    its default prompt applied."""
    features = model.preprocess(texts, prompt=model.prompts.get(model.default_prompt_name or ""))
    rows = zip(features["input_ids"], features["attention_mask"], strict=True)
    return [row[mask.bool()].tolist() for row, mask in rows]


def _onnx_gate(reference: Embedder, exported: Embedder, sets: dict, quantize: str | None, max_drop: float) -> dict:
    """Score ``sets`` with the PyTorch ``reference`` and the ONNX ``exported`` model, timing each encoding."""
    import torch

    from slmembed.evaluate import evaluate

    gate = {"quantize": quantize, "max_drop": max_drop, "threads": torch.get_num_threads()}
    for name, embedder in (("pytorch", reference), ("onnx", exported)):
        start = time.perf_counter()
        result = evaluate(embedder, sets, progress=True)
        gate[name] = {"scores": result["scores"], "average": result["average"],
                      "sentences_per_s": round(result["sentences"] / (time.perf_counter() - start), 1)}
        gate["sentences"] = result["sentences"]
    gate["drop"] = round(gate["pytorch"]["average"] - gate["onnx"]["average"], 2)
    return gate


def _write_onnx(run: RunDir, folder: Path, base: str, spec: EmbedSpec, quantize: str | None) -> Embedder:
    """The run's model as ``folder/model.onnx`` (int8 if asked) with its config and export tokenizer; returns the
    run's Embedder (float32, CPU), the gate's reference."""
    import torch
    from transformers import AutoTokenizer

    from slmembed import models, onnx_model
    from slmembed.loading import load_embedder

    reference = load_embedder(None, adapter=run.path, device=torch.device("cpu"), dtype=torch.float32)
    reference.model.config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(base))
    export_tokenizer(tokenizer, spec)
    tokenizer.save_pretrained(folder)
    if quantize:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.stage.") as staging:
            onnx_model.export_graph(reference, Path(staging) / onnx_model.FILE)
            onnx_model.quantize_int8(Path(staging) / onnx_model.FILE, folder / onnx_model.FILE,
                                     getattr(reference.model.config, "intermediate_size", None))
    else:
        onnx_model.export_graph(reference, folder / onnx_model.FILE)
    return reference


def _check_options(fmt: str, merge: bool, dtype: str, quantize: str | None, max_drop: float | None,
                   accept_drop: bool, evaluate_sets: dict | None) -> float | None:
    """Refuse options that do not go together (before any work); return the ONNX gate's largest drop (None for the
    other formats)."""
    if fmt not in FORMATS:
        raise SlmembedError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "onnx":
        if quantize or max_drop is not None or accept_drop:
            raise SlmembedError("--quantize, --max-drop and --accept-drop are for --format onnx")
        return None
    from slmembed.onnx_model import require

    require()
    if not merge or dtype != "float32":
        raise SlmembedError("--format onnx exports the merged model in float32 (--quantize int8 makes it "
                            "smaller): drop --no-merge and --dtype")
    if quantize not in MAX_DROP:
        raise SlmembedError(f"--quantize: expected int8, got {quantize!r}")
    if not evaluate_sets:
        raise SlmembedError("--format onnx scores the exported model before it finishes: give it STS sets")
    if max_drop is not None and not max_drop >= 0:  # NaN too, which no drop would exceed
        raise SlmembedError(f"--max-drop: expected points >= 0, got {max_drop}")
    return MAX_DROP[quantize] if max_drop is None else max_drop


def _check_format(spec: EmbedSpec, fmt: str, merge: bool) -> None:
    """Refuse a run that ``fmt`` (unmerged if not ``merge``) cannot carry as it was trained."""
    if fmt == "st" and not merge and spec.attention == "bidirectional":
        raise SlmembedError("a bidirectional run cannot be exported unmerged for sentence-transformers: it would load "
                            "the adapter over the base model's causal config and run causally; export it merged, or "
                            "with --format hf --no-merge (for slmembed, and PEFT with the keywords its card names)")


def _write_checked_onnx(run: RunDir, tmp: Path, output: Path, base: str, spec: EmbedSpec, out_spec: EmbedSpec,
                        quantize: str | None, sets: dict, max_drop: float, accept_drop: bool) -> dict:
    """Write the ONNX export into ``tmp`` and its ``eval.json``, once its token ids match and its quality gate passes
    (else nothing is written); return the gate."""
    from slmembed.onnx_model import OnnxEmbedder

    reference = _write_onnx(run, tmp, base, spec, quantize)
    check_token_ids(tmp, reference)
    gate = _onnx_gate(reference, OnnxEmbedder(tmp, out_spec), sets, quantize, max_drop)
    if gate["drop"] > max_drop and not accept_drop:
        raise SlmembedError(
            f"the ONNX model scores {gate['onnx']['average']:.2f} on {len(sets)} STS sets against "
            f"{gate['pytorch']['average']:.2f} for the PyTorch model: a drop of {gate['drop']:.2f}, above "
            f"--max-drop {max_drop}; nothing was written (--accept-drop exports it anyway)")
    (tmp / "eval.json").write_text(json.dumps({"model": str(output), **gate["onnx"], "onnx_check": gate},
                                              indent=2) + "\n")
    return gate


def _write_checked_model(run: RunDir, tmp: Path, output: Path, base: str, spec: EmbedSpec, fmt: str, merge: bool,
                         dtype: torch.dtype) -> None:
    """Write the ``st`` or ``hf`` export of ``output`` into ``tmp`` and check that it tokenises (and, bidirectional,
    attends) as the run does."""
    from slmembed import models

    if fmt == "st":
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{output.name}.stage.") as staging:
            reference = _write_transformers(run, Path(staging), base, spec, merge, dtype)
            _write_sentence_transformers(Path(staging), tmp, spec, dtype, None if merge else models.resolve(base),
                                         reference)
    else:
        reference = _write_transformers(run, tmp, base, spec, merge, dtype)
    check_token_ids(tmp, reference)
    if merge and spec.attention == "bidirectional":
        check_bidirectional(tmp, reference)


def _score_export(tmp: Path, output: Path, merge: bool, sets: dict) -> dict:
    """The model card's scores of the export in ``tmp``, scored by slmembed on ``sets`` (also its ``eval.json``)."""
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder

    exported = load_embedder(None, adapter=tmp) if not merge else load_embedder(str(tmp))
    card_scores = {"after": evaluate(exported, sets, progress=True),
                   "source": f"slmembed eval of this folder ({len(sets)} sets)"}
    (tmp / "eval.json").write_text(json.dumps({"model": str(output), **card_scores["after"]}, indent=2) + "\n")
    return card_scores


def export(run_dir: str | Path, output: str | Path, *, fmt: str = "st", merge: bool = True, dtype: str = "float32",
           scores: str | Path | None = None, evaluate_sets: dict | None = None, force: bool = False,
           quantize: str | None = None, max_drop: float | None = None, accept_drop: bool = False) -> dict:
    """Export the training run ``run_dir`` into the folder ``output``; return its saved spec (run.EmbedInfo, as a
    dict). An earlier export there is replaced (atomically) only with ``force``; see outputs.py for what else
    ``output`` may not be.

    Scores for the model card: ``scores`` (an eval or reproduce JSON), else the run's (``RunDir.scores``), else,
    with ``evaluate_sets``, the exported folder evaluated on those sets by slmembed (written to ``output/eval.json``).
    ``onnx``: ``evaluate_sets`` are the quality gate's sets (required); ``quantize="int8"``, ``max_drop`` and
    ``accept_drop`` as the module docstring says.
    """
    run_dir, output = Path(run_dir), Path(output)
    max_drop = _check_options(fmt, merge, dtype, quantize, max_drop, accept_drop, evaluate_sets)
    run = RunDir.find(run_dir)
    info = run.info()
    base, spec = info.model, info.spec
    if info.finetune == "full" and not merge:
        raise SlmembedError(f"{run_dir} trained every weight: it has no adapter to keep; export it merged (without "
                            "--no-merge)")
    check = functools.partial(outputs.check_folder, output, "export", inputs=[run.path, base, scores], force=force)
    check()
    _check_format(spec, fmt, merge)
    card_scores = read_scores(Path(scores)) if scores else None
    if card_scores is None and run.scores.exists():
        card_scores = read_scores(run.scores)

    out_dtype = _out_dtype(base, dtype)
    # How slmembed loads the result: merged folders tokenise with their own (EOS-appending) tokenizer.
    out_spec = dataclasses.replace(spec, append_eos=False) if merge else spec
    meta = EmbedInfo("export", base, out_spec, info.finetune, merged=merge, format=fmt, source_run=str(run_dir),
                     dtype=str(out_dtype).removeprefix("torch."), quantize=quantize)
    gate = None
    with outputs.writing(output, check), atomic_dir(output) as tmp:  # checked again, now that it is ours
        if fmt == "onnx":
            gate = _write_checked_onnx(run, tmp, output, base, spec, out_spec, quantize, evaluate_sets, max_drop,
                                       accept_drop)
            card_scores = {"after": gate["onnx"], "source": "the export's own check"}
        else:
            _write_checked_model(run, tmp, output, base, spec, fmt, merge, out_dtype)
            if card_scores is None and evaluate_sets:
                card_scores = _score_export(tmp, output, merge, evaluate_sets)
        meta.write(tmp)
        # Plain writes: the folder as a whole is fsynced and renamed into place.
        (tmp / "README.md").write_text(model_card(output.name, base, spec, fmt, merge, run, card_scores, gate))
        outputs.mark(tmp, "export", [e.name for e in tmp.iterdir()])
    return meta.to_dict()
