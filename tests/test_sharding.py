"""`train.sharding: fsdp` (sharding.py): two CPU processes under torchrun (gloo) with the model's blocks sharded by
FSDP2 train what the same two processes train under DDP: the same losses, STSBenchmark dev scores and adapter (LoRA)
or weights (full fine-tuning), checkpoints in the unsharded layout, and an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_packing import MORE, _model
from torch.distributed.fsdp import FSDPModule
from transformers import AutoTokenizer

from slmembed import sharding, tuning
from slmembed.cli import main
from slmembed.config import Recipe, recipe_from_dict
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec


def _recipe(tiny_models, **train) -> Recipe:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 128
    recipe.lora.dropout = 0.0
    for key, value in {"batch_size": 4, "max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "save_every": 2,
                       "bf16": False, "log_every": 1, **train}.items():
        setattr(recipe.train, key, value)
    return recipe


def _torchrun(recipe: Recipe, run, tmp_path, data_dir, *extra: str) -> None:
    config = tmp_path / f"{run.name}.yaml"
    config.write_text(recipe.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slmembed",
         "train", "--recipe", str(config), "--output", str(run), "--data-dir", str(data_dir), "--device", "cpu",
         *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_fsdp_lora_equals_ddp_and_resumes_exactly(tmp_path, tiny_models, data_dir) -> None:
    recipe = _recipe(tiny_models, dev_every=3, select="best_dev")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(recipe, ddp, tmp_path, data_dir)
    recipe.train.sharding = "fsdp"
    _torchrun(recipe, fsdp, tmp_path, data_dir)

    logs = _log(ddp), _log(fsdp)
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)
    dev = [[r["stsb_dev"] for r in log if "stsb_dev" in r] for log in logs]
    assert len(dev[0]) == 2 and dev[0] == pytest.approx(dev[1], abs=0.011)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (ddp, fsdp)]
    assert summaries[1]["world_size"] == 2 and summaries[0]["dev"]["step"] == summaries[1]["dev"]["step"]
    final = load_file(fsdp / "adapter/adapter_model.safetensors")
    _assert_same(load_file(ddp / "adapter/adapter_model.safetensors"), final)
    assert len(final) == 8 and max(v.abs().max() for v in final.values()) > 0.01  # trained, in peft's layout
    # checkpoints and dev snapshots hold the whole state in the unsharded layout, the same in both runs
    for a, b in zip(RunDir(ddp).checkpoints(), RunDir(fsdp).checkpoints(), strict=True):
        _assert_same(load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors"))

    # interrupted after its step-4 checkpoint, the sharded run resumes to the same adapter and log
    for name in ("adapter", "summary.json", "embed.json"):
        target = fsdp / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert [p.name for p in RunDir(fsdp).checkpoints()] == ["step-0000002", "step-0000004"]
    _torchrun(recipe, fsdp, tmp_path, data_dir, "--resume")
    _assert_same(final, load_file(fsdp / "adapter/adapter_model.safetensors"))
    assert [r["loss"] for r in _log(fsdp)] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)


def test_fsdp_full_fine_tuning_equals_ddp(tmp_path, tiny_models, data_dir) -> None:
    recipe = _recipe(tiny_models, finetune="full", lr=1e-4, max_steps=4)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(recipe, ddp, tmp_path, data_dir)
    recipe.train.sharding = "fsdp"
    _torchrun(recipe, fsdp, tmp_path, data_dir)
    a, b = load_file(ddp / "model/model.safetensors"), load_file(fsdp / "model/model.safetensors")
    _assert_same(a, b)
    base = load_file(tiny_models["llama"] / "model.safetensors")
    assert all(not torch.equal(base[f"model.{k}"], a[k]) for k in a if k.endswith("proj.weight"))  # trained


def test_fsdp_needs_several_processes_and_no_average(tmp_path, tiny_models, data_dir, capsys) -> None:
    recipe = _recipe(tiny_models, sharding="fsdp")
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run"),
                 "--data-dir", str(data_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "start several with torchrun" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SlmembedError, match="average_last: 3 cannot be combined with train.sharding"):
        recipe_from_dict({"train": {"sharding": "fsdp", "dev_every": 5, "average_last": 3}})


@pytest.mark.parametrize("arch", ["gemma", "phi", "llama", *MORE])
def test_every_architecture_shards_by_its_blocks(arch, tiny_models, tmp_path) -> None:
    """The paper's families and the others slmembed packs: sharded by their own decoder blocks, under LoRA, the model
    computes the unsharded one's embeddings and adapter gradients, so a larger backbone of any of them is the same
    recipe with ``train.sharding: fsdp`` (one process here; the torchrun tests above split it across two)."""
    import torch.distributed as dist

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = str(tiny_models[arch]) if arch in tiny_models else MORE[arch]
    recipe = _recipe(tiny_models)
    ids = [tokenizer(t)["input_ids"] for t in ("A man is playing a guitar.", "Two dogs run.", "Rain.")]

    def embed_and_grads(shard: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = tuning.prepare(_model(source, tokenizer), recipe)
        for name, p in model.named_parameters():  # B = 0 at init: give every adapter weight a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        if shard:
            sharding.shard(model, torch.device("cpu"))
            assert sum(isinstance(m, FSDPModule) for m in model.modules()) == model.config.num_hidden_layers + 1
        emb = Embedder(model, tokenizer, EmbedSpec(max_length=16), packed=False).forward_ids(ids)
        emb.square().sum().backward()
        grads = {n: p.grad.full_tensor() if shard else p.grad for n, p in model.named_parameters() if p.requires_grad}
        return emb.detach(), grads

    want, want_grads = embed_and_grads(shard=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got, got_grads = embed_and_grads(shard=True)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == 8
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-7)
