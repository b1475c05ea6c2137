"""The Triton backend (interpreted, NaN-poisoned outputs) under activation checkpointing: the
recompute in backward runs the same kernels and gives the plain backward's gradients (fp32, to
1e-5 relative: the kernels run the same tiles on the same inputs twice)."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import adapters
from adapters import AdapterConfig


def build(name, checkpointing):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    strategy = adapters.get_strategy(name, AdapterConfig(lora_targets="q,v"))
    model = adapters.use_kernels(strategy.apply(vit, 5), "triton")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b." in n:
                p.normal_(0, 0.1)  # B = 0 at init would leave dA = 0
    model.set_grad_checkpointing(checkpointing)
    return strategy, model.train()


def grads(strategy, model):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(3))
    extra = strategy.extra_loss(model, 9, 10)
    (loss if extra is None else loss + extra).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_triton_lora_gives_the_plain_gradients(triton_poisoned):
    """Selective LoRA: LoRA's kernels plus the gates' straight-through gradients."""
    plain, checkpointed = grads(*build("selective_lora", False)), grads(*build("selective_lora", True))
    assert any(".lora_score." in n for n in plain)
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-6, msg=n)
