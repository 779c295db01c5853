"""A training run as a model folder that other tools load: sentence-transformers (default) or plain transformers.

* ``st``: Transformer -> Pooling (last token, mean or CLS, as trained) -> Normalize, written by sentence-transformers
  itself, with the run's prompt (the text before ``{}``) as the model's default prompt.
* ``hf``: a transformers folder (``AutoModel.from_pretrained(OUT)``).

The LoRA adapter is merged into the base weights (safetensors) unless ``merge=False``, which keeps the PEFT adapter
(its ``base_model_name_or_path`` points at the base model's local folder or hub id). The exported tokenizer appends
EOS itself (its post-processor) and pads on the right, so ``SentenceTransformer(OUT).encode`` feeds the model the
very token ids of slmembed's ``Embedder.tokenize``; the export checks this before it is renamed into place.
``embed.json`` tells slmembed how to load the folder back, and ``README.md`` is a model card with the STS scores.

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
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from slmembed import attention, models, outputs
from slmembed.atomic import atomic_dir
from slmembed.embedder import Embedder, EmbedSpec, load_embedder
from slmembed.errors import SlmembedError

FORMATS = ("st", "hf")
ST_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Texts whose token ids the export compares with the Embedder's: short, punctuated, and one past max_length.
PROBES = ["A man is playing a guitar.", "Hi", "Zwei Hunde rennen über die Wiese!", "word " * 400]


def prompt_parts(spec: EmbedSpec) -> tuple[str, str]:
    """The prompt template's text before and after the ``{}`` placeholder."""
    prefix, _, suffix = spec.template.format("\0").partition("\0")
    return prefix, suffix


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
    """Raise unless the folder's tokenizer, given the prompted texts, gives ``reference.tokenize``'s token ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    got = tokenizer([reference.spec.template.format(t) for t in PROBES], truncation=True)["input_ids"]
    want = reference.tokenize(PROBES)
    for text, a, b in zip(PROBES, got, want):
        if a != b:
            raise SlmembedError(f"exported tokenizer gives {a[:8]}... for {text[:30]!r}, slmembed gives {b[:8]}...: "
                                "this tokenizer cannot be made to append EOS on its own")


def check_bidirectional(folder: Path, reference: Embedder) -> None:
    """Raise unless plain ``AutoModel.from_pretrained(folder)`` (as sentence-transformers loads it: SDPA, no remote
    code) is bidirectional on an unpadded text: its first token must see a change of the last one."""
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


def model_card(name: str, base: str, spec: EmbedSpec, fmt: str, merge: bool, run_dir: Path,
               scores: dict | None) -> str:
    """README.md for the exported folder: what it is, how to load it, how it was trained, and its STS scores."""
    hub_id = models.PACKAGED[base].hub_id if base in models.PACKAGED else base
    on_hub = hub_id.count("/") == 1 and not Path(hub_id).exists()
    about = f"[{hub_id}](https://huggingface.co/{hub_id})" if on_hub else f"`{hub_id}`"
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").exists() else None
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    prefix, suffix = prompt_parts(spec)
    pooling = {"last": "the last layer's hidden state at the EOS token the tokenizer appends",
               "mean": "the mean of the last layer's hidden states", "cls": "the first token's hidden state"}
    full = bool(recipe) and recipe["train"].get("finetune") == "full"
    tags = ["slmembed", "sentence-similarity", "feature-extraction", *([] if full else ["lora"])]
    meta = {"library_name": "sentence-transformers" if fmt == "st" else "transformers",
            "pipeline_tag": "sentence-similarity", **({"base_model": hub_id} if on_hub else {}), "tags": tags}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{about} turned into a sentence-embedding model by contrastive "
             f"fine-tuning with slmembed ({'every weight' if full else 'LoRA'}, InfoNCE over in-batch and hard "
             "negatives on NLI triplets)" + ("." if full else ", with the LoRA weights merged into the model." if merge
                                             else ", kept as a PEFT adapter."),
             "", f"Embedding: {pooling[spec.pooling]}, L2-normalised; inputs are truncated to {spec.max_length} "
             "tokens."]
    if prefix or suffix:
        lines.append(f"Each text is wrapped in the prompt `{spec.template}`"
                     + (" (the model's default prompt)." if fmt == "st" else "; apply it yourself."))
    lines += _attention_card(spec, base, merge)
    lines += ["", "## Use", ""]
    if fmt == "st":
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  f'model = SentenceTransformer("{name}")',
                  'vectors = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
                  "print(model.similarity(vectors[:1], vectors[1:]))", "```"]
    else:
        lines += ["```python", "from transformers import AutoModel, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # appends EOS, pads on the right',
                  f'model = AutoModel.from_pretrained("{name}")', "```",
                  "", f"then pool as above; or `slmembed serve {name}`."]
    if recipe:
        lora, train = recipe["lora"], recipe["train"]
        tuned = ("every weight" if full else f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout "
                 f"{lora['dropout']} on {', '.join(lora['targets'])}")
        lines += ["", "## Training", "",
                  f"{tuned}; lr {train['lr']} ({train['schedule']}, {train['warmup_steps']} "
                  f"warm-up steps), temperature {train['temperature']}, "
                  + ("hard negatives" if train["hard_negatives"] else "in-batch negatives only")
                  + (f"; {summary['steps']} steps of {summary['batch_size']} triplets on {summary['device']} in "
                     f"{summary['minutes']:.1f} min." if summary else ".")]
    lines += ["", "## STS scores", ""]
    if scores:
        lines += ["Spearman x100 of cosine similarity, MTEB conventions (slmembed's evaluator).", "",
                  _table(scores), "", f"Source: `{scores['source']}`."]
    else:
        lines.append("Not evaluated: export with `--eval`, or pass `--scores` an eval or reproduce JSON.")
    return "\n".join(lines) + "\n"


def _out_dtype(base: str, dtype: str) -> torch.dtype:
    """``auto``: the dtype the base model's weights are stored in (float32 if it does not say)."""
    if dtype != "auto":
        return DTYPES[dtype]
    config = Path(models.resolve(base)) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    return DTYPES.get(saved.get("dtype") or saved.get("torch_dtype"), torch.float32)


def _write_transformers(run_dir: Path, folder: Path, base: str, spec: EmbedSpec, merge: bool,
                        dtype: torch.dtype) -> Embedder:
    """The merged model (or the adapter) and the export tokenizer into ``folder``; returns the run's Embedder."""
    reference = load_embedder(None, adapter=run_dir, device=torch.device("cpu"), dtype=torch.float32)
    if merge:
        reference.model.to(dtype).save_pretrained(folder, safe_serialization=True)
    else:
        adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter / f, folder / f)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = models.resolve(base)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(base))
    export_tokenizer(tokenizer, spec)
    tokenizer.save_pretrained(folder)
    return reference


def _write_sentence_transformers(staging: Path, folder: Path, spec: EmbedSpec, dtype: torch.dtype,
                                 adapter_base: str | None) -> None:
    """Build Transformer -> Pooling -> Normalize from the transformers folder ``staging`` and save it to ``folder``.

    ``adapter_base``: ``staging`` holds a PEFT adapter (and the tokenizer) over this base model folder or hub id.
    """
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    # Text only: with the message modality, sentence-transformers would wrap texts in the chat template.
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    transformer = Transformer(adapter_base or str(staging), max_seq_length=spec.max_length,
                              model_kwargs={"dtype": dtype}, modality_config=text_only,
                              module_output_name="token_embeddings")
    if adapter_base:
        # The adapter is attached and saved by peft itself: transformers' own adapter saving ties the two libraries'
        # versions together (transformers 5.24 refuses to save an adapter with peft < 0.22). The module saves
        # (Transformer.save) its model and its processor, here the export tokenizer.
        transformer.model = PeftModel.from_pretrained(transformer.model, str(staging))
        transformer.processor = AutoTokenizer.from_pretrained(staging)
    prefix, _ = prompt_parts(spec)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), ST_POOLING[spec.pooling]), Normalize()],
        prompts={"default": prefix} if prefix else None, default_prompt_name="default" if prefix else None,
        device="cpu", similarity_fn_name="cosine")
    model.save(str(folder), create_model_card=False)


def export(run_dir: str | Path, output: str | Path, *, fmt: str = "st", merge: bool = True, dtype: str = "float32",
           scores: str | Path | None = None, evaluate_sets: dict | None = None, force: bool = False) -> dict:
    """Export the training run ``run_dir`` into the folder ``output``; return its embed.json. An earlier export there
    is replaced (atomically) only with ``force``; see outputs.py for what else ``output`` may not be.

    Scores for the model card: ``scores`` (an eval or reproduce JSON), else ``run_dir/eval.json`` if present, else,
    with ``evaluate_sets``, the exported folder evaluated on those sets by slmembed (written to ``output/eval.json``).
    """
    from slmembed.evaluate import evaluate

    run_dir, output = Path(run_dir), Path(output)
    if fmt not in FORMATS:
        raise SlmembedError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not (run_dir / "embed.json").exists():
        raise SlmembedError(f"{run_dir}: not a training run folder (no embed.json)")
    saved = json.loads((run_dir / "embed.json").read_text())
    base, spec = saved["model"], EmbedSpec(**saved["spec"])
    if saved.get("finetune") == "full" and not merge:
        raise SlmembedError(f"{run_dir} trained every weight: it has no adapter to keep; export it merged (without "
                            "--no-merge)")
    outputs.check_folder(output, "export", inputs=[run_dir, base, scores], force=force)
    if fmt == "st" and not merge and spec.attention == "bidirectional":
        raise SlmembedError("a bidirectional run cannot be exported unmerged for sentence-transformers: it would load "
                            "the adapter over the base model's causal config and run causally; export it merged, or "
                            "with --format hf --no-merge (for slmembed, and PEFT with the keywords its card names)")
    if fmt == "st" and prompt_parts(spec)[1]:
        raise SlmembedError(f"prompt {spec.template!r} has text after '{{}}': sentence-transformers prompts are "
                            "prefixes only; export with --format hf (slmembed applies the whole template)")
    card_scores = read_scores(Path(scores)) if scores else None
    if card_scores is None and (run_dir / "eval.json").exists():
        card_scores = read_scores(run_dir / "eval.json")
    out_dtype = _out_dtype(base, dtype)
    # How slmembed loads the result: merged folders tokenise with their own (EOS-appending) tokenizer.
    out_spec = dataclasses.replace(spec, append_eos=False) if merge else spec
    meta = {"model": base, "spec": out_spec.__dict__, "merged": merge, "format": fmt, "source_run": str(run_dir),
            "dtype": str(out_dtype).removeprefix("torch.")}
    with atomic_dir(output) as tmp:
        if fmt == "st":
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{output.name}.stage.") as staging:
                reference = _write_transformers(run_dir, Path(staging), base, spec, merge, out_dtype)
                _write_sentence_transformers(Path(staging), tmp, spec, out_dtype,
                                             None if merge else models.resolve(base))
        else:
            reference = _write_transformers(run_dir, tmp, base, spec, merge, out_dtype)
        check_token_ids(tmp, reference)
        if merge and spec.attention == "bidirectional":
            check_bidirectional(tmp, reference)
        del reference
        # Plain writes: the folder as a whole is fsynced and renamed into place.
        (tmp / "embed.json").write_text(json.dumps(meta, indent=2) + "\n")
        if card_scores is None and evaluate_sets:
            exported = load_embedder(None, adapter=tmp) if not merge else load_embedder(str(tmp))
            card_scores = {"after": evaluate(exported, evaluate_sets, progress=True),
                           "source": f"slmembed eval of this folder ({len(evaluate_sets)} sets)"}
            (tmp / "eval.json").write_text(json.dumps({"model": str(output), **card_scores["after"]}, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(output.name, base, spec, fmt, merge, run_dir, card_scores))
        outputs.mark(tmp, "export", [e.name for e in tmp.iterdir()])
    return meta
