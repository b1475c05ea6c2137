"""Shared builders for the strategy tests: tiny random ViTs for numbers, ViT-B on the meta device for counts."""
import torch
import timm
from timm.models.vision_transformer import VisionTransformer

from engine.config import AdapterConfig


def tiny_vit(depth=4, embed_dim=64, num_heads=4, seed=0, **kwargs):
    """A random ViT small enough for exact numerical tests on a CPU (32 px, 16 patches)."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             num_classes=10, **kwargs).eval()


def vit_b_meta():
    """timm's vit_base_patch16_224, parameters on the meta device: exact counts, no init cost."""
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


def cfg(**kwargs):
    return AdapterConfig(**kwargs)


def sgd_steps(model, steps=3, lr=0.5, num_classes=10, seed=1, strategy=None):
    """A few SGD steps on random data, the way the engine trains: only requires_grad parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, num_classes, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if strategy is not None:
            extra = strategy.extra_loss(model, step, steps)
            if extra is not None:
                loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        if strategy is not None:
            strategy.on_step(model, step, steps)
    return model.eval()


def images(n=3, seed=123):
    """Random 32 px inputs."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=5):
    """Give every B a non-zero value so the update is visible (at init B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model
