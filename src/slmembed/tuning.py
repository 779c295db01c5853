"""What training updates: LoRA adapters on a frozen backbone (``train.finetune: lora``, the paper's) or every weight
(``full``). The one home of that difference: preparing the model, the trainable state that checkpoints and dev
snapshots hold, averaging states, and the weights a run folder keeps (``adapter/`` or ``model/``).

Averaging LoRA states is done on the products, not the factors: the mean of ``k`` updates ``s B_i A_i`` is itself a
LoRA update of rank ``k r``, ``s' B' A'`` with ``A' = [A_1; ...; A_k]``, ``B' = [B_1, ..., B_k] / k`` and the same
scale ``s' = alpha' / r' = alpha / r``. Averaging ``A`` and ``B`` separately would not give the mean of the updates.
Updates of different ranks at one scale (a run that kept an average is one: soup.py) average alike, to the sum of
their ranks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from slmembed import models, sharding
from slmembed.config import Recipe
from slmembed.device import computes_bf16
from slmembed.errors import SlmembedError
from slmembed.run import ADAPTER_WEIGHTS

AVERAGE = "average"  # the name of the adapter that holds an averaged LoRA state


def uses_bf16(recipe: Recipe, device: torch.device) -> bool:
    """Whether training computes in bf16: ``train.bf16`` asks for it and ``device`` computes it natively
    (``device.computes_bf16``). Elsewhere it runs in float32, which is faster there as well as exact."""
    return recipe.train.bf16 and computes_bf16(device)


def weights_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """The backbone's stored dtype: bf16 under LoRA (the frozen weights only compute), fp32 for full fine-tuning
    (the optimizer updates them; bf16 compute comes from autocast), fp32 where training does not use bf16."""
    return torch.bfloat16 if uses_bf16(recipe, device) and recipe.train.finetune == "lora" else torch.float32


def lora_config(recipe: Recipe, n_layers: int) -> LoraConfig:
    """peft's LoraConfig for the recipe's ``lora`` section, checked against the model's ``n_layers``."""
    cfg = recipe.lora
    if cfg.layers is not None and not all(-n_layers <= i < n_layers for i in cfg.layers):
        raise SlmembedError(f"lora.layers: expected layer numbers from {-n_layers} to {n_layers - 1} (the model has "
                            f"{n_layers} layers), got {cfg.layers}")
    layers = sorted({i % n_layers for i in cfg.layers}) if cfg.layers is not None else None
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets,
                      layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)


def prepare(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """The model to train: wrapped with LoRA adapters, or with every weight trainable."""
    if recipe.train.finetune == "full":
        return model.requires_grad_(True)
    _check_targets(model, recipe.lora.targets)
    return get_peft_model(model, lora_config(recipe, model.config.num_hidden_layers))


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Refuse ``lora.targets`` that match no module of ``model`` in one line, where peft's refusal is a traceback
    that names no recipe field; matched as peft matches a list: a module's name is a target or ends in ``.target``."""
    modules = dict(model.named_modules())
    if not any(name == t or name.endswith(f".{t}") for name in modules for t in targets):
        linear = sorted({name.rpartition(".")[2] for name, m in modules.items() if isinstance(m, torch.nn.Linear)})
        raise SlmembedError(f"lora.targets: none of {', '.join(targets)} is a module of this "
                            f"{model.config.model_type} model; its linear layers are {', '.join(linear)}")


def state(model: torch.nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """What training changed: the adapter's tensors, or every weight (copied to the host). A sharded model's are
    gathered whole: every process must call it then."""
    lora = recipe.train.finetune == "lora"
    if sharding.is_sharded(model):
        return sharding.gather_state(model, lora)
    tensors = get_peft_model_state_dict(model) if lora else model.state_dict()
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], recipe: Recipe) -> None:
    """Put a ``state`` back into the model it came from (into every process's shards, for a sharded model)."""
    if sharding.is_sharded(model):
        sharding.scatter_state(model, tensors, recipe.train.finetune == "lora")
    elif recipe.train.finetune == "lora":
        set_peft_model_state_dict(model, tensors)
    else:
        model.load_state_dict(tensors)


def average(model: torch.nn.Module, states: list[dict[str, torch.Tensor]], recipe: Recipe) -> None:
    """Make ``model`` compute with the mean of ``states``: loaded into its weights (full fine-tuning), or as the
    active adapter ``AVERAGE`` whose rank is the sum of theirs, ``k r`` (LoRA, at the scale of the ``default``
    adapter; see the module docstring). ``use_trained`` switches back."""
    k = len(states)
    if recipe.train.finetune == "full":
        model.load_state_dict({name: sum(s[name].float() for s in states).div(k).to(states[0][name].dtype)
                               for name in states[0]})
        return
    merged = {}
    for name in states[0]:
        parts = [s[name] for s in states]
        merged[name] = (torch.cat(parts, 0) if ".lora_A." in name else torch.cat(parts, 1) / k if ".lora_B." in name
                        else sum(p.float() for p in parts).div(k).to(parts[0].dtype))
    base = model.peft_config["default"]
    rank = sum(next(t.shape[0] for name, t in s.items() if ".lora_A." in name) for s in states)
    alpha = base.lora_alpha * rank / base.r  # the scale alpha / r stays
    if AVERAGE in model.peft_config:
        model.delete_adapter(AVERAGE)
    model.add_adapter(AVERAGE, dataclasses.replace(base, r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                                                   lora_dropout=0.0))
    set_peft_model_state_dict(model, merged, adapter_name=AVERAGE)
    model.set_adapter(AVERAGE)


def use_trained(model: torch.nn.Module, recipe: Recipe) -> None:
    """Undo ``average`` for LoRA runs: the trained adapter is active again (full runs reload their own state)."""
    if recipe.train.finetune == "lora" and AVERAGE in model.peft_config:
        model.set_adapter("default")


def save_final(model: torch.nn.Module, tokenizer, folder: Path, recipe: Recipe,
               tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the run's weights into ``folder``: the active adapter as a PEFT adapter folder, or the whole model (and
    its tokenizer) as a transformers folder. A sharded model's weights come gathered, as ``tensors`` (``state``)."""
    if recipe.train.finetune == "full":
        model.save_pretrained(folder, safe_serialization=True, state_dict=tensors)
        tokenizer.save_pretrained(folder)
        return
    name = model.active_adapter
    config = dataclasses.replace(model.peft_config[name], inference_mode=True)
    config.save_pretrained(str(folder))
    tensors = tensors if tensors is not None else get_peft_model_state_dict(model, adapter_name=name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})


def read_final(folder: Path, recipe: Recipe, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The trained state (``state``'s tensors, on the host) that ``save_final`` wrote into ``folder``."""
    if recipe.train.finetune == "full":
        return state(models.load(str(folder), trust_remote_code=trust_remote_code)[0], recipe)
    return load_file(folder / ADAPTER_WEIGHTS)
