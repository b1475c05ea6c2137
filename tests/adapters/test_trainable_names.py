"""What trains is declared: `trainable_names` is exactly what requires grad, and what an adapter file holds."""
import pytest

from adapters import STRATEGIES, get_strategy
from adapters.base import Strategy
from adapter_helpers import cfg, sgd_steps, tiny_vit

OPTIONS = {"top_k": dict(top_k=2), "block_expansion": dict(blocks=2), "lora": dict(lora_targets="q,v,fc1"),
           "selective_lora": dict(active_blocks=3, search_fraction=0.5)}


def requiring_grad(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_what_requires_grad_is_exactly_the_declared_set_in_model_order(name):
    strategy = get_strategy(name, cfg(**OPTIONS.get(name, {})))
    model = strategy.apply(tiny_vit(), 10)
    assert strategy.trainable_names(model) == requiring_grad(model)


def test_selective_lora_declares_the_set_that_fixing_its_gates_leaves():
    strategy = get_strategy("selective_lora", cfg(active_blocks=3, search_fraction=0.5))
    model = sgd_steps(strategy.apply(tiny_vit(), 10), steps=4, strategy=strategy)
    assert strategy.fixed
    names = strategy.trainable_names(model)
    assert names == requiring_grad(model)
    assert not any(".lora_score." in n for n in names)
    assert sum(".lora_a." in n for n in names) == 3


def test_every_strategy_declares_its_set():
    assert all(cls.trainable_names is not Strategy.trainable_names for cls in STRATEGIES.values())


def test_a_name_the_model_lacks_is_an_internal_error():
    class Wrong(Strategy):
        name = "wrong"

        def trainable_names(self, model):
            return ["no.such.weight"]

    with pytest.raises(RuntimeError, match="no.such.weight"):
        Wrong(cfg()).apply(tiny_vit(), 10)
