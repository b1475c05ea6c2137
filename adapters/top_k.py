"""Top-k: the last k transformer blocks, the final norm and the new head train."""
from .base import Strategy, freeze, head_modules, new_head, unfreeze
from .registry import register


@register
class TopK(Strategy):
    name = "top_k"

    def apply(self, model, num_classes):
        k = self.cfg.top_k
        depth = len(model.blocks)
        if not 1 <= k <= depth:
            raise ValueError(f"top_k must be between 1 and the model's depth {depth}, got {k}")
        new_head(model, num_classes)
        freeze(model)
        for block in model.blocks[depth - k:]:
            unfreeze(block)
        unfreeze(model.norm)
        for m in head_modules(model):
            unfreeze(m)
        return model
