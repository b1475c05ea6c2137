"""Linear probing: only the new head trains; the backbone is untouched, so nothing is forgotten."""
from .base import Strategy, freeze, head_modules, new_head, unfreeze
from .registry import register


@register
class Linear(Strategy):
    name = "linear"

    def apply(self, model, num_classes):
        new_head(model, num_classes)
        freeze(model)
        for m in head_modules(model):
            unfreeze(m)
        return model
