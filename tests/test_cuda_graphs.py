"""``train.cuda_graphs``: a step run through a graph's fixed-shape inputs (the filler sequence, the filled negative
slots and their mask) gives the ordinary step's loss and gradients; steps share a bucket's graph; in two processes
without DDP's wrapper, the graph's own gradient average gives DDP's gradients and both processes take the same
bucket; on a GPU the replayed training equals the ordinary one; where it cannot run it is refused in one line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_loss import _free_port
from test_packing import _model
from test_train import _tiny_recipe
from transformers import AutoTokenizer

from slmembed import cuda_graphs
from slmembed import train as train_mod
from slmembed.cli import main
from slmembed.compile import compile_blocks
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.losses.infonce import info_nce
from slmembed.spec import EmbedSpec
from slmembed.train import StepBatch, batch_loss

SENTENCES = [f"sentence {i} " + "word " * (i % 5) for i in range(40)]


def _embedder(tiny_models) -> Embedder:
    return _embedder_of(str(tiny_models["llama"]))


def _embedder_of(folder: str) -> Embedder:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = get_peft_model(_model(folder, tokenizer),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    return Embedder(model.train(), tokenizer, EmbedSpec(max_length=32), packed=True)


def _batch(embedder: Embedder, rows: np.ndarray, missing: set[int]) -> StepBatch:
    """Triplets of SENTENCES (anchor i, positive i+1, negative i+2), the negatives of rows in ``missing`` absent."""
    examples = [(SENTENCES[i], SENTENCES[i + 1], None if i in missing else SENTENCES[i + 2]) for i in range(30)]
    token_ids = dict(zip(SENTENCES, embedder.tokenize(SENTENCES), strict=True))
    return StepBatch.of(examples, rows, [0, 1, 2], token_ids)


def _grads(embedder: Embedder) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in embedder.model.named_parameters() if p.requires_grad}
    embedder.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("missing", [set(), {3, 7}])
def test_graph_inputs_give_the_ordinary_loss_and_gradients(tiny_models, missing) -> None:
    embedder = _embedder(tiny_models)
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    step = cuda_graphs.GraphedStep(embedder, info_nce, 0.05, params, bf16=False, max_tokens=4096)
    batch = _batch(embedder, np.arange(2, 12), missing)
    want = batch_loss(info_nce, batch, embedder.forward_ids(batch.ids, 4096), 0.05)
    want.backward()
    want_grads = _grads(embedder)
    got = step(batch)
    got_grads = _grads(embedder)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 8
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if missing:  # the absent negatives' slots hold one pad token each, masked out
        ids, mask = step.layout(batch)
        assert len(ids) == 30 and mask.tolist() == [i + 2 not in missing for i in range(10)]
        assert [ids[20 + i] for i in range(10) if i + 2 in missing] == [[embedder.tokenizer.pad_token_id]] * 2


def test_buckets_pad_by_256_tokens_or_under_7_percent() -> None:
    sizes = range(1, 200_000, 37)
    buckets = {n: cuda_graphs.bucket_of(n) for n in sizes}
    assert all(n < b <= n + max(256, n * 0.0625) for n, (b, _) in buckets.items())  # one filler token or more
    assert [b for b, _ in buckets.values()] == sorted(b for b, _ in buckets.values())
    assert [cuda_graphs.bucket_of(n)[0] for n in (1, 255, 256, 3_200, 8_191, 8_192, 27_327)] == \
        [256, 256, 512, 3_328, 8_192, 8_704, 27_648]
    assert len({cuda_graphs.bucket_of(n) for n in range(26_000, 28_600)}) == 3  # batch 512's steps: a few graphs
    # The filler bound is recorded with a bucket's graph as the attention kernel's longest sequence: every step of the
    # bucket must have its filler within it (1,024 tokens of filler under a bound of 256 gave NaN losses on the H200).
    bound: dict[int, int] = {}
    for n, (b, filler) in buckets.items():
        assert bound.setdefault(b, filler) == filler and b - n <= filler


def test_the_attention_bound_covers_the_filler(tiny_models) -> None:
    embedder = _embedder(tiny_models)
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    step = cuda_graphs.GraphedStep(embedder, info_nce, 0.05, params, bf16=False, max_tokens=1 << 20)
    step.longest = 8  # as if max_length were 8 tokens: a bucket's filler is then the longest sequence
    assert step(_batch(embedder, np.arange(0, 6), set())) is not None
    (entry,) = step.graphs.values()
    lengths = entry.inputs["cu_seq_lens"].diff()
    assert entry.inputs["max_length"] >= int(lengths.max()) and int(lengths[-1]) > 8


def test_steps_of_similar_size_share_a_bucket(tiny_models) -> None:
    embedder = _embedder(tiny_models)
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    step = cuda_graphs.GraphedStep(embedder, info_nce, 0.05, params, bf16=False, max_tokens=512)
    sizes = []
    for rows in (np.arange(0, 6), np.arange(1, 7), np.arange(10, 26)):
        batch = _batch(embedder, rows, set())
        sizes.append(sum(len(x) for x in batch.ids))
        assert step(batch) is not None
    buckets = sorted(step.graphs)
    assert buckets == sorted({cuda_graphs.bucket_of(n)[0] for n in sizes})
    # a step into a bucket already recorded runs on its inputs copied into the bucket's tensors: the ordinary loss
    batch = _batch(embedder, np.arange(1, 7), set())
    want = batch_loss(info_nce, batch, embedder.forward_ids(batch.ids, 4096), 0.05)
    embedder.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(step(batch), want.detach(), rtol=1e-5, atol=1e-6)
    assert len(buckets) == 2 and all(step.graphs[b].inputs["input_ids"].shape == (1, b) for b in buckets)
    assert step(_batch(embedder, np.arange(0, 30), set())) is None  # over max_tokens: run the ordinary way
    assert sorted(step.graphs) == buckets


@pytest.mark.parametrize("setting,expected", [
    (["--device", "cpu"], "train.cuda_graphs records the step on a GPU; this run is on the cpu: "
                          "set train.cuda_graphs=false"),
])
def test_cuda_graphs_where_they_cannot_run_are_one_line(capsys, tmp_path, setting, expected) -> None:
    out = tmp_path / "run"
    assert main(["train", "--recipe", "demo-smollm2", "--output", str(out), "--set", "train.cuda_graphs=true",
                 *setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"slmembed: error: {expected}", err
    assert not out.exists()


def _replica(rank: int, world: int, port: int, folder: str, out) -> None:
    """One of two processes over gloo: a graphed step (its CPU path) on this process's share without DDP's wrapper,
    then the ordinary step through DDP on the same share; losses, gradients and the buckets taken."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different adapters until the first process's are broadcast
    embedder = _embedder_of(folder)
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    cuda_graphs.broadcast_parameters(params)
    batches = [_batch(embedder, np.arange(11 * r, 11 * r + 11), {3, 14}) for r in range(world)]  # 2 buckets alone
    step = cuda_graphs.GraphedStep(embedder, info_nce, 0.05, params, bf16=False, max_tokens=4096)
    own = step.size(batches[rank])
    loss = step(batches[rank], max(step.size(b) for b in batches))
    graphed = _grads(embedder)
    ddp = Embedder(torch.nn.parallel.DistributedDataParallel(embedder.model), embedder.tokenizer, embedder.spec,
                   packed=True)
    want = batch_loss(info_nce, batches[rank], ddp.forward_ids(batches[rank].ids, 4096), 0.05)
    want.backward()
    out[rank] = (loss, want.detach(), graphed, _grads(embedder), sorted(step.graphs), cuda_graphs.bucket_of(own)[0])
    dist.destroy_process_group()


def test_two_processes_average_their_gradients_in_the_graph_and_share_buckets(tiny_models) -> None:
    world, out = 2, mp.Manager().dict()
    mp.start_processes(_replica, args=(world, _free_port(), str(tiny_models["llama"]), out), nprocs=world,
                       start_method="spawn")
    for rank in range(world):
        loss, want, graphed, ddp, buckets, own = out[rank]
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        assert graphed.keys() == ddp.keys() and len(graphed) == 8
        for name, grad in ddp.items():
            torch.testing.assert_close(graphed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(graphed[name], out[0][2][name], rtol=0, atol=0)  # the same everywhere
        assert buckets == out[0][4]  # one bucket for both: the larger share's
    assert out[0][5] != out[1][5]  # though each share alone would take its own


@pytest.mark.parametrize("kwargs,expected", [
    ({"sharded": True}, "train.cuda_graphs and train.sharding=fsdp exclude each other"),
    ({"grad_cache": True}, "train.cuda_graphs and train.grad_cache exclude each other"),
    ({"packing": False}, "train.cuda_graphs runs packed steps: set train.packing=true"),
    ({"reference": True}, "train.cuda_graphs does not record the reference's vectors"),
])
def test_cuda_graphs_refusals(kwargs, expected) -> None:
    settings = {"device": torch.device("cuda"), "sharded": False, "grad_cache": False, "packing": None, **kwargs}
    with pytest.raises(SlmembedError, match=re.escape(expected)):
        cuda_graphs.check(True, **settings)
    cuda_graphs.check(False, **settings)  # off: nothing to refuse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: run on the GPU machine "
                                                          "(bench/plans/multi-gpu.sh graphs)")
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_training_equals_ordinary_training_on_the_gpu(tmp_path, tiny_models, data_dir, monkeypatch,
                                                              compiled) -> None:
    replayed, call = [], cuda_graphs.GraphedStep.__call__

    def counted(self, batch, largest=None):
        loss = call(self, batch, largest)
        replayed.append(loss is not None)
        return loss

    monkeypatch.setattr(cuda_graphs.GraphedStep, "__call__", counted)
    runs, losses = {}, {}
    for graphs in (False, True):
        recipe = _tiny_recipe(tiny_models, max_steps=8, bf16=True, compile=compiled, cuda_graphs=graphs,
                              chunk_tokens=65536, save_every=100)
        recipe.lora.dropout = 0.0  # the warm-up pass before a recording draws dropout masks of its own
        train_mod.train(recipe, tmp_path / str(graphs), data_dir=data_dir, device="cuda", progress=False)
        runs[graphs] = load_file(tmp_path / f"{graphs}/adapter/adapter_model.safetensors")
        losses[graphs] = [json.loads(line)["loss"] for line in (tmp_path / f"{graphs}/train_log.jsonl").open()]
    assert replayed == [True] * 8
    # Equal within bf16's noise (the filler changes the products' shapes, FlashAttention's backward is not
    # deterministic): every step's loss, and each adapter tensor within 5% of its norm.
    assert len(losses[True]) == 8
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-2)
    assert runs[True].keys() == runs[False].keys()
    assert all(value.abs().max() > 0 for key, value in runs[True].items() if "lora_B" in key)  # it trained
    for key, value in runs[False].items():
        assert (runs[True][key] - value).norm() <= 0.05 * value.norm(), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two processes of CUDA graphs over NCCL: run on the "
                                                          "two-GPU machine (bench/plans/multi-gpu.sh graphs-test)")
def test_graphed_training_on_two_gpus_equals_ddp(tmp_path, tiny_models, data_dir) -> None:
    """torchrun, two GPUs: graphs holding the loss's gather and the gradients' all-reduce train the adapter DDP's
    ordinary steps train (global batch 16), within bf16's noise."""
    import subprocess
    import sys

    runs, losses = {}, {}
    for graphs in (False, True):
        recipe = _tiny_recipe(tiny_models, max_steps=8, bf16=True, batch_size=8, cuda_graphs=graphs,
                              chunk_tokens=65536, save_every=100)
        recipe.lora.dropout = 0.0
        config, out = tmp_path / f"{graphs}.yaml", tmp_path / str(graphs)
        config.write_text(recipe.to_yaml())
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slmembed",
             "train", "--recipe", str(config), "--output", str(out), "--data-dir", str(data_dir), "--device", "cuda"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[graphs] = load_file(out / "adapter/adapter_model.safetensors")
        losses[graphs] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()]
    assert len(losses[True]) == 8
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-2)
    assert all(value.abs().max() > 0 for key, value in runs[True].items() if "lora_B" in key)
    for key, value in runs[False].items():
        assert (runs[True][key] - value).norm() <= 0.05 * value.norm(), key


def test_serving_graphs_give_the_ordinary_vectors_and_are_reused(tiny_models) -> None:
    """GraphedEncoder's static inputs (sequence slots to the next power of two, tokens to the bucket) give
    ``forward_ids``'s vectors; a batch of the same slots and bucket reuses its entry with new contents; batches over
    the token or row bound are left to the caller (None)."""
    embedder = _embedder(tiny_models)
    embedder.model.eval()
    ids = embedder.tokenize(SENTENCES)
    encoder = cuda_graphs.GraphedEncoder(embedder, max_tokens=1024, max_rows=8)
    with torch.inference_mode():
        start = 0
        for n in (1, 3, 4, 5, 3):  # the second 3 reuses the entry of the first (and of 4) with other sentences
            batch = ids[start : start + n]
            got = encoder(batch)
            torch.testing.assert_close(got, embedder.forward_ids(batch), rtol=0, atol=1e-5)
            start += n
        assert sorted(encoder.graphs) == [(1, 256), (4, 256), (8, 256)]
        assert encoder(ids[:9]) is None  # 16 slots
        assert encoder([[5] * 600, [6] * 600]) is None  # a 1,280-token bucket
        assert sorted(encoder.graphs) == [(1, 256), (4, 256), (8, 256)]
    unpacked = Embedder(embedder.model, embedder.tokenizer, embedder.spec, packed=False)
    with pytest.raises(SlmembedError, match=r"^--cuda-graphs replays packed forwards, which PeftModel does not run"):
        cuda_graphs.GraphedEncoder(unpacked)


def test_a_server_with_cuda_graphs_answers_through_them(tiny_models) -> None:
    """``create_app(cuda_graphs=True)``: requests are embedded by the graphs (the CPU's static-input path), with the
    direct vectors; a lone text's graph is recorded before the first request."""
    from fastapi.testclient import TestClient

    from slmembed.adapters import Single
    from slmembed.serve import create_app

    embedder = _embedder(tiny_models)
    embedder.model.eval()
    calls = []
    real = cuda_graphs.GraphedEncoder.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_graphs.GraphedEncoder, "__call__",
                      lambda self, ids: calls.append(len(ids)) or real(self, ids))
        with TestClient(create_app(Single(embedder, "tiny"), cuda_graphs=True)) as client:
            assert calls == [1]
            reply = client.post("/v1/embeddings", json={"model": "tiny", "input": SENTENCES[:3]})
    assert reply.status_code == 200 and calls == [1, 3]
    got = np.array([row["embedding"] for row in reply.json()["data"]])
    np.testing.assert_allclose(got, embedder.encode(SENTENCES[:3]), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: run on the GPU machine")
@pytest.mark.parametrize("compiled", [False, True])
def test_recorded_serving_graphs_replay_the_ordinary_vectors_on_the_gpu(tiny_models, compiled: bool) -> None:
    """Recorded and replayed on a GPU in bf16, batches of 1-8 short texts: ``forward_ids``'s vectors within bf16's
    rounding, replay after replay; with compiled blocks (`serve --compile`) recorded in the graphs too."""
    embedder = _embedder(tiny_models)
    embedder.model.to("cuda", torch.bfloat16).eval()
    if compiled:
        compile_blocks(embedder.model)
    embedder = Embedder(embedder.model, embedder.tokenizer, embedder.spec, packed=True)
    ids = embedder.tokenize(SENTENCES)
    encoder = cuda_graphs.GraphedEncoder(embedder)
    with torch.inference_mode():
        for start, n in ((0, 1), (1, 3), (4, 8), (12, 3), (15, 1)):
            batch = ids[start : start + n]
            torch.testing.assert_close(encoder(batch), embedder.forward_ids(batch), rtol=0, atol=2e-2)
    assert all(graph is not None for _, graph, _ in encoder.graphs.values())


def test_default_graphs_that_fail_to_record_leave_the_server_eager(tiny_models, monkeypatch, caplog) -> None:
    """Graphs by default (not asked for): if the warm-up's recording fails, the server logs one warning and embeds
    without them; asked for (``--cuda-graphs``), the failure stops the server's start."""
    from fastapi.testclient import TestClient

    from slmembed import serve
    from slmembed.adapters import Single

    embedder = _embedder(tiny_models)
    embedder.model.eval()
    monkeypatch.setattr(serve, "graphs_wanted", lambda asked, served, embedder: True)
    calls = []

    def failing(self, ids):
        calls.append(len(ids))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs.GraphedEncoder, "__call__", failing)
    with caplog.at_level("WARNING", logger="slmembed.serve"), \
            TestClient(serve.create_app(Single(embedder, "tiny"), cuda_graphs=None)) as client:
        reply = client.post("/v1/embeddings", json={"model": "tiny", "input": SENTENCES[:3]})
    assert calls == [1]  # the warm-up only: requests run eagerly
    assert [r.getMessage() for r in caplog.records if r.name == "slmembed.serve"] == [
        "serving without CUDA graphs: recording one failed (RuntimeError: operation not permitted when stream is "
        "capturing)"]
    got = np.array([row["embedding"] for row in reply.json()["data"]])
    np.testing.assert_allclose(got, embedder.encode(SENTENCES[:3]), atol=1e-5)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        serve.create_app(Single(embedder, "tiny"), cuda_graphs=True)
