"""CLIP checkpoints as users have them: OpenAI's released files and open_clip's.

Both hold the image and the text tower in one state dict, in OpenAI's layout: `visual.*` (conv1,
class_embedding, positional_embedding, ln_pre, transformer.resblocks.N, ln_post, proj) beside the
text tower (token_embedding, positional_embedding, transformer.*, ln_final, text_projection,
logit_scale). OpenAI's release (`ViT-B-16.pt`) is a TorchScript archive (read with torch.jit.load);
open_clip's training checkpoints wrap it as {"state_dict": {"module.visual...": ...}}, its hub
files are the plain dict. `engine.models` reads the file and hands a CLIP state dict here:
`image_tower` converts the image part to timm's names with timm's own filter
(`vision_transformer.checkpoint_filter_fn`, which also turns `visual.proj` into `head.weight`, transposed;
the engine drops that head and keeps the projection for zero-shot: `engine.zeroshot`).

OpenAI's CLIP was trained with QuickGELU; timm's `vit_*_clip_*` image towers use GELU and its
`vit_*_clip_quickgelu_*` ones QuickGELU. The weights load into either; the original model's
outputs are the quickgelu variant's (`uses_quick_gelu` decides the text tower's activation too).
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

VISUAL = "visual."
TEXT_KEYS = ("token_embedding.weight", "text_projection", "ln_final.weight", "positional_embedding")
_META = ("input_resolution", "context_length", "vocab_size")  # scalars OpenAI's state dict carries


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's release): a zip with constants.pkl and code/ (torch.save's zip has neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (its parameters and buffers, on the CPU)."""
    with warnings.catch_warnings():  # torch.jit.load's deprecation note is not the user's business
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach() for k, v in module.state_dict().items()}


def is_clip_state(state: dict) -> bool:
    """An OpenAI-layout CLIP state dict (prefixes such as `module.` already stripped)."""
    return f"{VISUAL}class_embedding" in state and f"{VISUAL}proj" in state


def has_text_tower(state: dict) -> bool:
    return all(k in state for k in TEXT_KEYS)


def is_clip_model(name: str) -> bool:
    """A timm CLIP image tower by name (vit_base_patch16_clip_224.openai, ..._clip_quickgelu_224, ...)."""
    return "_clip" in name.split(".", 1)[0]


def uses_quick_gelu(name: str) -> bool:
    return "quickgelu" in name.split(".", 1)[0]


def image_tower(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The image tower of a CLIP state dict in `model`'s (timm's) names, by timm's own filter: the
    position embedding resampled where the model's grid differs; `visual.proj` becomes `head.weight`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = {k: v.float() for k, v in state.items() if k.startswith(VISUAL)}  # OpenAI's are half precision
    return checkpoint_filter_fn(visual, model)


def projection(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The untouched image projection (D, E), float32: image embedding = feature @ projection."""
    return state[f"{VISUAL}proj"].float()


def text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict open_clip's `build_model_from_openai_state_dict` takes: without OpenAI's scalar
    entries and the attention masks a traced model carries as buffers."""
    return {k: v for k, v in state.items() if k not in _META and not k.endswith("attn_mask")}
