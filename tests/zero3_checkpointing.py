"""Run on two ranks inside the shared launch (tests/conftest.py `two_rank_runs`, read by
tests/test_large_batch.py), or alone as `torchrun --nproc_per_node 2 tests/zero3_checkpointing.py OUT`:
ZeRO-3 with activation checkpointing and frozen parameters (the combination DeepSpeed PR #8130
saw crash in the recompute) on two CPU ranks, built as engine.train builds it. For each strategy,
the full gradients of one step with checkpointing and of the same step without it; rank 0 writes
per strategy the largest difference between them and the largest gradient to OUT (JSON)."""
import json
import sys

import deepspeed
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import adapters
from adapters import AdapterConfig
from engine.config import TrainConfig
from engine.distributed import deepspeed_config, init_distributed, register_container_parameters
from engine.optim import make_optimizer

# Selective LoRA: frozen base weights, LoRA and gate scores held in ParameterDicts (external parameters
# under ZeRO-3); block expansion: frozen blocks below and between trained whole blocks.
STRATEGIES = {"selective_lora": {"penalty_warmup": 0.0}, "block_expansion": {"blocks": 2}}


def gradients(name: str, checkpointing: bool, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    strategy = adapters.get_strategy(name, AdapterConfig(**STRATEGIES[name]))
    model = strategy.apply(vit, 5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b." in n:
                p.normal_(0, 0.1)  # B = 0 at init would leave dA = 0
    if checkpointing:
        model.set_grad_checkpointing(True)
    cfg = TrainConfig(batch_size=4 * world, zero_stage=3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg),
                                           config=deepspeed_config(cfg, world))
    register_container_parameters(engine.module)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    loss = F.cross_entropy(engine(x), y)
    extra = strategy.extra_loss(engine.module, 1, 10)
    engine.backward(loss if extra is None else loss + extra)
    return {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
            if p.requires_grad}


def main(out: str) -> None:
    rank, world = init_distributed()
    report = {}
    for name in STRATEGIES:
        plain, checkpointed = gradients(name, False, rank, world), gradients(name, True, rank, world)
        assert plain.keys() == checkpointed.keys()
        report[name] = {"max_abs_difference": max((checkpointed[n] - g).abs().max().item() for n, g in plain.items()),
                        "max_abs_gradient": max(g.abs().max().item() for g in plain.values()),
                        "parameters": len(plain)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
