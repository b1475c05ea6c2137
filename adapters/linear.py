"""Linear probing: only the new head trains; the backbone is untouched, so nothing is forgotten."""
from .base import Strategy, head_names
from .registry import register


@register
class Linear(Strategy):
    name = "linear"

    def trainable_names(self, model):
        return head_names(model)
