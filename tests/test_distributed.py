"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 losses (also with packing and with micro-batches by tokens)
equal a 1-process run with the same global batch; also as two "nodes" (two torchrun launchers meeting at a c10d
rendezvous)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.test_train import SMALL

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not found")

COMMON = [*SMALL, "train.save_every=0", "stages[0].max_steps=2", "stages[1].max_steps=2"]


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def pad_shares(run):
    return [json.loads(line)["pad_share"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # 1 process, per-device batch 4, 2 accumulation steps = global batch 8
    run([sys.executable, "-m", "mmkit.train", "recipes/tiny.yaml", *COMMON, f"train.output_dir={out}"])
    return out


@pytest.mark.parametrize("strategy,workers,packing,by_tokens", [
    ("ddp", None, False, False), ("fsdp", None, False, False), ("ddp", 1, False, False), ("ddp", None, True, False),
    ("ddp", None, False, True), ("fsdp", None, True, True)],
    ids=["ddp", "fsdp", "ddp-1-worker", "ddp-packed", "ddp-by-tokens", "fsdp-packed-by-tokens"])
def test_two_processes_match_one(single, tmp_path, strategy, workers, packing, by_tokens):
    out = tmp_path / strategy
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # None: the default rule (no worker for 2 processes on 2 CPUs); 1: one DataLoader worker per rank
    loading = [f"data.num_workers={workers}", f"stages[1].data.num_workers={workers}"] if workers else []
    # packed micro-batches on each rank against the unpacked single-process run
    loading += ["data.packing=true", "stages[1].data.packing=true"] if packing else []
    # micro-batches by a token budget: the ranks' shares of a step may cut into different numbers of them
    loading += ["data.batch_by_tokens=256", "stages[1].data.batch_by_tokens=256"] if by_tokens else []
    # 2 processes x per-device batch 4 x 1 accumulation step = the same global batch 8
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train", "recipes/tiny.yaml", *COMMON,
         f"train.output_dir={out}", f"train.strategy={strategy}", *loading], env={"OMP_NUM_THREADS": "1"})
    a, b = losses(single), losses(out)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert (out / "final" / "model.safetensors").is_file()
    # pad_share counts the micro-batches of all ranks: the same micro-batches as the 1-process run
    pads_a, pads_b = pad_shares(single), pad_shares(out)
    if not (packing or by_tokens):
        assert pads_a == pads_b, (pads_a, pads_b)
    elif not by_tokens:
        assert all(y <= x for x, y in zip(pads_a, pads_b)), (pads_a, pads_b)


def test_fsdp_sharded_checkpoint_reloads_in_one_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    import mmkit
    from mmkit.train.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "fsdp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train", "recipes/tiny.yaml", *COMMON,
         f"train.output_dir={out}", "train.strategy=fsdp", "plugins.shapes_demo.heldout_images=1"],
        env={"OMP_NUM_THREADS": "1"})
    ckpt = latest_checkpoint(out / "checkpoints")
    assert (ckpt / "dcp" / ".metadata").is_file() and json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    model = mmkit.load(out / "final")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_checkpoint(ckpt, model)  # 2 shards -> 1 process, no process group
    final = load_file(str(out / "final" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_match_one(single, tmp_path, strategy):
    """Two launchers, one process each, as on two machines: ``--nnodes 2`` and a c10d rendezvous on this host."""
    out = tmp_path / f"{strategy}-2-nodes"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", f"mmkit-test-{strategy}",
           "-m", "mmkit.train", "recipes/tiny.yaml", *COMMON, f"train.output_dir={out}", f"train.strategy={strategy}",
           *(["train.save_every=2", "plugins.shapes_demo.heldout_images=1"] if strategy == "fsdp" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, logs):
        assert node.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    # one launcher per node, each with one process: 2 processes in all, as the plan line says
    assert "4 per device x 2 processes x 1 accumulation" in (out / "train.log").read_text()
    a, b = losses(single), losses(out)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert (out / "final" / "model.safetensors").is_file()
    if strategy == "fsdp":  # each node's process wrote its shard of the sharded checkpoint
        ckpt = sorted(p for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))[-1]
        assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2
        assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2


def test_fsdp_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """A 2-process FSDP run killed after stage 1 step 1, resumed by one process: the sharded checkpoint loads
    resharded and the run ends where the uninterrupted 2-process run does (within 1e-5: other reductions)."""
    import torch
    from safetensors.torch import load_file

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = [*COMMON, "train.strategy=fsdp", "train.save_every=1", "plugins.shapes_demo.heldout_images=1"]
    env = {"OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train", "recipes/tiny.yaml", *common,
         f"train.output_dir={ref}"], env=env)
    out = tmp_path / "killed"
    killed = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tests.faults", "train",
                             "--kill-at", "1:1", "--", "recipes/tiny.yaml", *common, f"train.output_dir={out}"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert killed.returncode != 0 and not (out / "final").exists()
    ckpt = out / "checkpoints" / "stage1-step000001"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    proc = run([sys.executable, "-m", "mmkit.train", "recipes/tiny.yaml", *common, f"train.output_dir={out}",
                "--resume"])
    assert "resuming from" in proc.stdout + proc.stderr
    a, b = losses(ref), losses(out)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    wa, wb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)
