"""Top-k: the last k transformer blocks, the final norm and the new head train."""
from .base import Strategy, head_names, names_under
from .options import AdapterError
from .registry import register


@register
class TopK(Strategy):
    name = "top_k"

    def insert(self, model):
        depth = len(model.blocks)
        if not 1 <= self.cfg.top_k <= depth:
            raise AdapterError(f"top_k must be between 1 and the model's depth {depth}, got {self.cfg.top_k}")

    def trainable_names(self, model):
        depth = len(model.blocks)
        top = [f"blocks.{i}" for i in range(depth - self.cfg.top_k, depth)]
        return names_under(model, *top, "norm") + head_names(model)
