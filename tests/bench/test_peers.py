"""HF peft's worker process (bench/peers.py): it imports none of this project's packages, so that
transformers finds Hugging Face's `kernels`; its errors come back with their message; it ends when
its stdin closes; it builds the engine's optimiser."""
import importlib.util
import os
import signal
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bench import lora_problems as lp
from bench import peers
from bench.processes import ROOT
from bench.strategy_steps import optimiser_spec

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


@needs_peft
def test_the_worker_imports_peft_beside_hugging_faces_kernels_and_none_of_ours():
    worker = peers.shared()
    here_before = {"peft", "transformers"} & set(sys.modules)  # another test of this process may have (open_clip)
    lp.hf_peft_layer(lp.build_problem("proj", 1, 2, "fp32", "cpu"))  # peft, and so transformers, imported there
    imported = worker.call("modules")
    assert not {"adapters", "engine", "bench"} & set(imported)
    try:
        theirs = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except metadata.PackageNotFoundError:  # no Hugging Face's kernels: transformers imports none
        theirs = None
    if theirs is not None and importlib.util.find_spec("transformers") is not None:
        assert Path(imported["kernels"]).resolve() == theirs != ROOT / "kernels" / "__init__.py"
    assert {"peft", "transformers"} & set(sys.modules) == here_before  # and none of peft here


@needs_peft
def test_an_error_in_the_worker_comes_back_with_its_message_and_the_worker_goes_on():
    worker = peers.shared()
    with pytest.raises(peers.PeerError, match=r"(?s)Unknown model \(no_such_vit\).*in the peer worker.*create_model"):
        worker.call("peft_vit", label="bad", model="no_such_vit", img_size=32, num_classes=3, batch=2, device="cpu",
                    target_modules=r".*\.attn\.proj", rank=8, optimizer={}, amp=None)
    assert "engine" not in worker.call("modules")


def test_an_unknown_op_is_refused_by_name():
    with pytest.raises(peers.PeerError, match="unknown op 'nope'"):
        peers.shared().call("nope")


def test_closing_its_stdin_ends_the_worker():
    worker = peers.PeerWorker()
    assert worker.close() is None  # never started
    worker.call("modules")
    pid = worker.pid
    assert worker.close() == 0  # it left its loop on end of input, by itself
    assert not Path(f"/proc/{pid}").exists()


def test_a_worker_that_died_is_one_clear_error():
    with peers.PeerWorker() as worker:
        worker.call("modules")
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(peers.PeerError, match=r"the peer worker \(pid \d+\) ended \(exit -9\) during 'modules'"):
            worker.call("modules")


@needs_peft
def test_the_worker_trains_peft_with_the_engines_optimiser():
    import torch

    from engine.config import TrainConfig
    from engine.optim import make_optimizer

    cfg = TrainConfig()
    info = peers.shared().call("peft_vit", label="optimiser", model="vit_tiny_patch16_224", img_size=32,
                               num_classes=3, batch=2, device="cpu", target_modules=r".*\.attn\.proj", rank=8,
                               optimizer=optimiser_spec(cfg), amp=None)
    ours = make_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 3)), cfg)
    assert info["optimizer"]["class"] == type(ours).__name__
    hyper = [{k: v for k, v in g.items() if k not in ("params", "numel")} for g in info["optimizer"]["groups"]]
    assert hyper == [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups]
    assert sum(g["numel"] for g in info["optimizer"]["groups"]) == info["trainable_params"] \
        == 12 * 8 * (192 + 192) + 3 * 192 + 3  # ViT-Ti: LoRA r 8 on each block's proj, and the 3-class head
    peers.shared().call("drop", keys=["optimiser"])
