"""LLM2Vec's adaptation of a decoder into an encoder, before supervised training (BehnamGhader et al. 2024, arXiv
2404.05961): the recipe's ``adapt`` section.

The causal LM (with its LM head) is made bidirectional (attention.py), then, each stage a fresh LoRA adapter (``r``,
``alpha``, on ``lora.targets``: tuning.py) merged into the weights when it ends (peft's ``merge_and_unload``):

* **MNTP** (``mntp_steps``): masked next-token prediction. transformers' DataCollatorForLanguageModeling masks a
  fraction ``mntp_mask`` of the tokens BERT-style (80% the mask token, 10% a random token, 10% kept; a decoder without
  a mask token uses "_", as LLM2Vec does, or its pad token), and the token at a masked position ``i`` is predicted from
  the output at ``i - 1`` (losses/mntp.py);
* **SimCSE** (``simcse_steps``): unsupervised SimCSE, each sentence embedded twice (mean pooling) with attention
  dropout ``simcse_dropout`` on; the two views are positives, the batch's other sentences negatives (losses/simcse.py).

The text is the unique sentences of the recipe's NLI training examples, never evaluation text. Each stage is AdamW
with a linear warm-up over a tenth of its steps and linear decay, its batches a seeded permutation of the sentences
per epoch (batch.py). The adapted model is saved with its tokenizer into the run folder (``RunDir.adapted``,
atomically, with the stages' record in ``adapt.json``); the supervised phase trains from it, and a resumed run reuses
it.

Several processes: each takes its share of every step's sentences and the gradients are averaged over them (the
SimCSE loss gathers every rank's views, as the supervised loss does), so every process holds the same weights; the
first writes the folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import DataCollatorForLanguageModeling, get_scheduler

from slmembed import attention, models, tuning
from slmembed.atomic import atomic_dir, write_json
from slmembed.batch import batch_indices
from slmembed.config import Recipe
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.losses.mntp import IGNORE, mntp_loss, predictors
from slmembed.losses.simcse import simcse_loss
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec

RECORD = "adapt.json"  # in the adapted folder: what each stage did (steps, losses)
LORA_DROPOUT = 0.05  # LLM2Vec's, for both stages
TEMPERATURE = 0.05  # SimCSE's (LLM2Vec's loss scale 20)
BLANK = "_"  # LLM2Vec's mask token for decoders that have none


def mask_token(tokenizer) -> str:
    """The token MNTP masks with: the tokenizer's own, else "_" where it is one token, else the pad token."""
    if tokenizer.mask_token is not None:
        return tokenizer.mask_token
    blank = tokenizer.convert_tokens_to_ids(BLANK)
    if blank is not None and blank != tokenizer.unk_token_id:
        return BLANK
    return tokenizer.pad_token


def collator(tokenizer, probability: float, seed: int) -> DataCollatorForLanguageModeling:
    """transformers' MLM collator over a copy of ``tokenizer`` given a mask token (``mask_token``) and right padding,
    masking ``probability`` of the tokens with its own generator seeded ``seed``; the tokenizer itself (which the
    adapted folder keeps) is left as it is."""
    masking = copy.deepcopy(tokenizer)
    masking.mask_token = mask_token(tokenizer)
    masking.padding_side = "right"  # positions count from 0 without position ids
    return DataCollatorForLanguageModeling(masking, mlm=True, mlm_probability=probability, seed=seed)


def reuse(run: RunDir) -> dict | None:
    """The stages' record of the run's adapted model, if it was written whole (the folder is renamed into place
    complete: atomic.py), else None."""
    try:
        record = json.loads((run.adapted / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and (run.adapted / "config.json").is_file() else None


def adapt(recipe: Recipe, texts: list[str], run: RunDir, acc: Accelerator, bf16: bool) -> dict:
    """Run the recipe's stages on ``texts`` and save the adapted model into ``run.adapted`` (every process calls it);
    reuse the folder if it is complete. The stages' record: per stage its steps, batch, learning rate, first and last
    loss, and final loss (the mean over the last ``train.log_every`` steps)."""
    done = reuse(run)
    if done is not None:
        acc.print(f"adapt: reusing {run.adapted} ({', '.join(done)})")
        return done
    ac, device = recipe.adapt, acc.device
    if len(texts) < max(ac.mntp_batch if ac.mntp_steps else 0, ac.simcse_batch if ac.simcse_steps else 0):
        raise SlmembedError(f"adapt: {len(texts)} unique sentences are fewer than one batch of adapt.mntp_batch "
                            f"({ac.mntp_batch}) or adapt.simcse_batch ({ac.simcse_batch})")
    # float32 weights (bf16 compute through autocast): each merge adds the stage's small update to the weights exactly,
    # where bf16 weights would round much of it away; saved in the dtype the base model is stored in.
    mc, cuda = recipe.model, device.type == "cuda"
    lm, tokenizer = models.load(mc.name, dtype=torch.float32, lm_head=True, trust_remote_code=mc.trust_remote_code,
                                allow_pickle=mc.allow_pickle, attn_implementation=None if cuda else "eager",
                                device=device if cuda else None)
    lm.to(device)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:  # the collator draws random tokens below len()
        raise SlmembedError(f"adapt: {mc.name}'s tokenizer has {len(tokenizer)} tokens, more than its embedding table "
                            f"({lm.get_input_embeddings().num_embeddings}): MNTP cannot mask it")
    attention.use(lm, "bidirectional")
    record = {}
    if ac.mntp_steps:
        record["mntp"] = _stage(lm, recipe, acc, bf16, "mntp", _mntp(recipe, texts, lm, tokenizer, acc), len(texts))
    if ac.simcse_steps:
        record["simcse"] = _stage(lm, recipe, acc, bf16, "simcse", _simcse(recipe, texts, lm, tokenizer), len(texts))
    attention.use(lm, "causal")  # saved as the base model was: the run's spec makes it bidirectional where it runs
    if acc.is_main_process:
        with atomic_dir(run.adapted) as tmp:
            lm.to(models.stored_dtype(mc.name)).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / RECORD, record)
    acc.wait_for_everyone()
    return record


# This process's rows of a step -> their loss, its backward done; it runs ``lm``, whose layers the stage's LoRA adapter
# wraps in place while the stage lasts.
Step = Callable[[np.ndarray], torch.Tensor]


def _stage(lm: torch.nn.Module, recipe: Recipe, acc: Accelerator, bf16: bool, name: str, step: Step, n: int) -> dict:
    """One stage: a fresh LoRA adapter on ``lm``, trained by ``step`` as the recipe's ``adapt`` section says for
    ``name``, on batches of the indices of ``n`` sentences, then merged into ``lm``. The stage's record."""
    ac = recipe.adapt
    steps, batch, lr = (getattr(ac, f"{name}_{key}") for key in ("steps", "batch", "lr"))
    lora = dataclasses.replace(recipe.lora, r=ac.r, alpha=ac.alpha, dropout=LORA_DROPOUT, layers=None)
    model = tuning.prepare(lm, dataclasses.replace(recipe, lora=lora,
                                                   train=dataclasses.replace(recipe.train, finetune="lora")))
    params = [p for p in model.parameters() if p.requires_grad]
    world = acc.num_processes
    if world > 1:  # the same adapter everywhere, whatever each process's random state
        for p in params:
            dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    model.train()
    losses = []
    for k in range(steps):
        rows = batch_indices(n, batch, k, recipe.train.seed)[acc.process_index::world]
        with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step(rows)
        if world > 1:  # each process's gradient of its share's loss, averaged: the mean loss's gradient
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            dist.all_reduce(loss)
            loss /= world
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SlmembedError(f"adapt: the {name} loss is {losses[-1]} at step {k + 1}; lower adapt.{name}_lr")
        if (k + 1) % recipe.train.log_every == 0 or k + 1 == steps:
            acc.print(f"adapt {name} step {k + 1}/{steps}: loss {losses[-1]:.4f}")
    model.eval()
    model.merge_and_unload()  # into lm's weights, its layers unwrapped
    return {"steps": steps, "batch": batch, "lr": lr, "first_loss": round(losses[0], 5),
            "last_loss": round(losses[-1], 5), "final_loss": round(float(np.mean(losses[-recipe.train.log_every:])), 5)}


def _mntp(recipe: Recipe, texts: list[str], lm: torch.nn.Module, tokenizer, acc: Accelerator) -> Step:
    """MNTP's step: this process's sentences masked (``collator``) and run through ``lm`` in pieces of at most
    ``train.chunk_tokens`` padded tokens, each piece's loss weighted by its share of the masked tokens (so that the
    pieces' gradients add up to that of the whole share's loss)."""
    encoded = tokenizer(texts, truncation=True, max_length=recipe.model.max_length, return_special_tokens_mask=True)
    features = [{"input_ids": ids, "special_tokens_mask": special} for ids, special in
                zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True)]
    collate = collator(tokenizer, recipe.adapt.mntp_mask, recipe.train.seed + acc.process_index)

    def step(rows: np.ndarray) -> torch.Tensor:
        batch = collate([features[i] for i in sorted(rows, key=lambda i: len(features[i]["input_ids"]))])
        predicted = (batch["labels"][:, 1:] != IGNORE).sum(1)  # per row
        pieces = max(1, math.ceil(batch["input_ids"].numel() / recipe.train.chunk_tokens))
        total = torch.zeros((), device=acc.device)
        for part in np.array_split(np.arange(len(rows)), pieces):
            share = predicted[part].sum().item() / max(1, predicted.sum().item())
            if share == 0:
                continue
            width = int(batch["attention_mask"][part].sum(1).max())
            piece = {k: v[part, :width].to(acc.device) for k, v in batch.items()}
            hidden = lm.get_decoder()(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"])
            loss = mntp_loss(logits(lm, hidden.last_hidden_state[predictors(piece["labels"])]), piece["labels"]) * share
            loss.backward()
            total += loss.detach()
        return total

    return step


def logits(lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits of the hidden states ``hidden`` [M, H]: its output layer, then the final soft cap of the
    models that have one (Gemma 2 and 3), as their forward applies it; only where MNTP predicts a token, since the
    logits of every position of a 262k vocabulary took 8 GiB a piece."""
    out = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return out if cap is None else torch.tanh(out / cap) * cap


def _simcse(recipe: Recipe, texts: list[str], lm: torch.nn.Module, tokenizer) -> Step:
    """SimCSE's step: this process's sentences embedded twice by ``lm``'s decoder (mean pooling, the recipe's prompt
    and length; attention dropout ``simcse_dropout``) and ``simcse_loss`` of the two views."""
    spec = dataclasses.replace(EmbedSpec.of(recipe.model), pooling="mean")
    embedder = Embedder(lm.get_decoder(), tokenizer, spec, packed=False)  # packed kernels would skip the dropout
    ids = embedder.tokenize(texts)
    set_attention_dropout(lm, recipe.adapt.simcse_dropout)

    def step(rows: np.ndarray) -> torch.Tensor:
        loss = simcse_loss(*views(embedder, [ids[i] for i in rows], recipe.train.chunk_tokens), TEMPERATURE)
        loss.backward()
        return loss.detach()

    return step


def set_attention_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout ``p`` on the attention probabilities of ``model``'s attention modules, which read it in each forward
    (in training mode); transformers sets it from the config only when it builds them."""
    for module in attention.modules(model):
        module.attention_dropout = p


def views(embedder: Embedder, ids: list[list[int]], chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embeddings [N, D] of each of the token id lists ``ids``, from two forwards (in one batch): with dropout
    on, two dropout masks."""
    both = embedder.forward_ids(list(ids) * 2, chunk_tokens)
    return both[: len(ids)], both[len(ids):]
