"""All: every parameter of the backbone and the new head trains (the forgetting baseline)."""
from .base import Strategy, new_head, unfreeze
from .registry import register


@register
class Full(Strategy):
    name = "full"

    def apply(self, model, num_classes):
        new_head(model, num_classes)
        unfreeze(model)
        return model
