"""All: every parameter of the backbone and the new head trains (the forgetting baseline)."""
from .base import Strategy
from .registry import register


@register
class Full(Strategy):
    name = "full"

    def trainable_names(self, model):
        return [name for name, _ in model.named_parameters()]
