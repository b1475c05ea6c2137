"""Block Expansion: identity copies after each group's top block; only the copies and the head train."""
import copy
import re

import pytest
import torch

from adapters import get_strategy, trainable_parameter_count
from adapters.block_expansion import group_tops, identity_copy
from adapter_helpers import cfg, images, sgd_steps, tiny_vit, vit_b_meta


def expanded(model, blocks):
    strategy = get_strategy("block_expansion", cfg(blocks=blocks))
    return strategy.apply(model, 10).eval(), strategy


@pytest.mark.parametrize("blocks, expected", [(1, 7_164_772), (2, 14_252_644), (3, 21_340_516), (4, 28_428_388)])
def test_trainable_parameters_on_vit_base_with_100_classes(blocks, expected):
    model = get_strategy("block_expansion", cfg(blocks=blocks)).apply(vit_b_meta(), 100)
    assert trainable_parameter_count(model) == expected == blocks * 7_087_872 + 76_900
    assert len(model.blocks) == 12 + blocks


@pytest.mark.parametrize("size", [dict(depth=4, embed_dim=64, num_heads=4), dict(depth=6, embed_dim=96, num_heads=3)])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_expanded_model_equals_the_original(size, blocks):
    original = tiny_vit(**size)
    model, _ = expanded(copy.deepcopy(original), blocks)
    original.head.load_state_dict(model.head.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model(x), original(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("depth, blocks, tops", [
    (12, 1, [11]), (12, 2, [5, 11]), (12, 3, [3, 7, 11]), (12, 4, [2, 5, 8, 11]), (12, 12, list(range(12))),
    # Not divisible: groups as even as possible, the first depth % blocks groups one block larger.
    (12, 5, [2, 5, 7, 9, 11]), (12, 7, [1, 3, 5, 7, 9, 10, 11]), (4, 3, [1, 2, 3]), (6, 4, [1, 3, 4, 5]),
])
def test_copies_follow_the_top_block_of_each_group(depth, blocks, tops):
    assert group_tops(depth, blocks) == tops


def test_a_copy_sits_directly_after_its_source_with_zeroed_output_layers():
    model, strategy = expanded(tiny_vit(depth=6, embed_dim=96, num_heads=3), 4)  # 6 = 2 + 2 + 1 + 1
    assert strategy.positions == [1, 3, 4, 5]
    # expanded order: 0 1 1' 2 3 3' 4 4' 5 5'
    sources = {2: 1, 5: 4, 7: 6, 9: 8}
    for copy_index, source_index in sources.items():
        new, src = model.blocks[copy_index], model.blocks[source_index]
        for name, p in new.named_parameters():
            if name.startswith(("attn.proj.", "mlp.fc2.")):
                assert torch.count_nonzero(p) == 0, name
            else:
                assert torch.equal(p, src.get_parameter(name)), name


def test_only_the_copies_and_the_head_train():
    model, _ = expanded(tiny_vit(depth=6, embed_dim=96, num_heads=3), 2)  # copies after 2 and 5
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.3", "blocks.7", "head"}


def test_sgd_leaves_the_original_blocks_unchanged():
    model, _ = expanded(tiny_vit(), 2)  # copies at expanded indices 2 and 5
    before = copy.deepcopy(model.state_dict())
    sgd_steps(model)
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
               for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"blocks.2", "blocks.5", "head"}


def test_frozen_blocks_below_the_first_copy_build_no_autograd_graph():
    model, _ = expanded(tiny_vit(depth=6, embed_dim=96, num_heads=3), 2)  # 0 1 2 2' 3 4 5 5'
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
    model.train()(images()).sum().backward()
    assert all(outputs[i].grad_fn is None and not outputs[i].requires_grad for i in (0, 1, 2))
    assert all(outputs[i].grad_fn is not None for i in range(3, 8))


def test_state_stores_the_positions_and_loading_rebuilds_them():
    model, strategy = expanded(tiny_vit(depth=6, embed_dim=96, num_heads=3), 2)
    assert strategy.state() == {"positions": [2, 5], "depth": 6}
    other, rebuilt = expanded(tiny_vit(depth=6, embed_dim=96, num_heads=3), 2)
    rebuilt.load_state(other, {"positions": [0, 3], "depth": 6})  # e.g. a checkpoint from another split rule
    assert rebuilt.positions == [0, 3] and len(other.blocks) == 8
    trainable = sorted({int(n.split(".")[1]) for n, p in other.named_parameters()
                        if p.requires_grad and n.startswith("blocks.")})
    assert trainable == [1, 5]  # 0 0' 1 2 3 3' 4 5
    x = images()
    original = tiny_vit(depth=6, embed_dim=96, num_heads=3)
    original.head.load_state_dict(other.head.state_dict())
    assert torch.allclose(other(x), original(x), atol=1e-6, rtol=0)


def test_finalize_is_a_plain_timm_model_of_depth_n_plus_p():
    model, strategy = expanded(tiny_vit(), 3)
    final = strategy.finalize(model)
    assert set(final.state_dict()) == set(tiny_vit(depth=7).state_dict())


def test_more_copies_than_blocks_raise_a_clear_value_error():
    with pytest.raises(ValueError, match=re.escape("blocks (P) must be between 1 and the model's depth 4, got 5")):
        expanded(tiny_vit(), 5)


def test_non_positive_blocks_raise_a_clear_value_error():
    with pytest.raises(ValueError, match="blocks \\(P\\) to be a positive integer"):
        get_strategy("block_expansion", cfg(blocks=0))


def test_a_block_without_attention_and_mlp_output_layers_is_a_clear_value_error():
    with pytest.raises(ValueError, match="needs timm ViT blocks with attn.proj and mlp.fc2"):
        identity_copy(torch.nn.Linear(4, 4))
