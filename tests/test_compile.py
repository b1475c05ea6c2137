"""train.compile: the embedded LoRA model's training forward is one graph holding the fused op (no
graph break), and compiled steps train as eager ones do.

The test compiles the train step with the aot_eager backend (AOTAutograd's forward and backward
graphs, run eagerly: what the graph capture and the custom op's autograd decide), not inductor,
whose C++ code generation would add to the minute (wall, on this shared 2-core machine; about 30 s
of CPU time) that capture and AOTAutograd already take. The inductor path is timed by
bench.engine_overhead (engine-compiled) and run by bench/gpu_check.sh.
"""
import dataclasses

import pytest
import torch

import adapters
from engine import train as train_module
from engine.config import RunConfig
from engine.distributed import init_distributed
from engine.models import apply_strategy, build_backbone
from engine.train import _DeviceLoss, make_engine, optimiser_step

FUSED_OP = torch.ops.kernels.lora_linear_torch.default
BATCHES = 3
# Compiled against eager losses, fp32, 3 SGD steps: the graphs reorder no reduction that matters more.
LOSS_RTOL = 1e-5


def _model(strategy_name: str, cfg: RunConfig):
    torch.manual_seed(0)
    strategy = adapters.get_strategy(strategy_name, cfg.adapter)
    return apply_strategy(strategy, build_backbone(cfg.model), 10, "torch"), strategy


def test_the_compiled_lora_step_is_one_graph_holding_every_fused_op_and_gives_the_eager_losses(monkeypatch):
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", counting_aot_eager)
    init_distributed()
    cfg = RunConfig()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(BATCHES)]
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, strategy = _model("lora", cfg)
        train_cfg = dataclasses.replace(cfg.train, compile=compiled, batch_size=8, warmup_steps=0)
        engine, *_ = make_engine(model, train_cfg, [g for g in strategy.param_groups(model) if g])
        per_step = []
        for step, batch in enumerate(batches, 1):
            device_loss = _DeviceLoss(torch.device("cpu"))
            optimiser_step(engine, strategy, lambda: batch, train_cfg, torch.device("cpu"), step, device_loss)
            per_step.append(device_loss.read()[0])
        losses[compiled] = per_step
        assert engine.module._compiled_call_impl is not None if compiled else engine.module._compiled_call_impl is None
    assert len(graphs) == 1, "a graph break (or a recompile) makes more than one graph"
    targets = [node.target for node in graphs[0].graph.nodes]
    assert targets.count(FUSED_OP) == len(model.blocks)  # LoRA on q and v of each block's qkv: one fused call
    assert losses[True] == pytest.approx(losses[False], rel=LOSS_RTOL)
    assert losses[False][0] != pytest.approx(losses[False][-1], rel=1e-3)  # the steps did train


def test_zero_stage_0_on_one_process_reduces_no_gradient(monkeypatch):
    """One rank has nothing to all-reduce; DeepSpeed would flatten, reduce and copy back every gradient.
    (The gradient clipping's norm, one number, is still all-reduced inside DeepSpeed.)"""
    init_distributed()
    reduced = []  # elements per all-reduce
    original = torch.distributed.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    cfg = RunConfig()
    model, strategy = _model("linear", cfg)
    train_cfg = dataclasses.replace(cfg.train, zero_stage=0, batch_size=8)
    engine, *_ = make_engine(model, train_cfg, [g for g in strategy.param_groups(model) if g])
    head = model.head.weight.detach().clone()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    reduced.clear()
    optimiser_step(engine, strategy, lambda: batch, train_cfg, torch.device("cpu"), 1, _DeviceLoss(torch.device("cpu")))
    assert [n for n in reduced if n > 1] == [], reduced
    assert not torch.equal(model.head.weight, head)  # the step did update
