"""kernels.MAX_RANK is the largest LoRA rank the engine takes: the one the Triton kernels are compiled
and checked for (tests/kernels/test_triton_aot.py). Above it, a run is refused when it is configured,
and lora_linear refuses before any work."""
import pytest
import torch

from adapters import AdapterConfig, AdapterError
from engine.config import build_config
from engine.errors import UserError
from kernels import MAX_RANK, lora_linear


def test_the_largest_rank_is_accepted():
    AdapterConfig(lora_rank=MAX_RANK).check()


def test_a_rank_above_the_largest_is_refused_naming_the_limit():
    with pytest.raises(AdapterError, match=f"lora_rank {MAX_RANK + 1} is above {MAX_RANK}"):
        AdapterConfig(lora_rank=MAX_RANK + 1).check()


def test_the_run_config_refuses_it_before_any_model_is_built():
    with pytest.raises(UserError, match=f"above {MAX_RANK}"):
        build_config(overrides=[f"adapter.lora_rank={MAX_RANK + 1}"])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_lora_linear_refuses_a_segment_above_the_largest_rank(backend):
    k, r = 16, MAX_RANK + 1
    x, w = torch.randn(3, k), torch.randn(k, k)
    with pytest.raises(ValueError, match=f"segment 0 has rank {r}, above {MAX_RANK}"):
        lora_linear(x, w, None, [torch.randn(r, k)], [torch.randn(k, r)], [0], 1.0, backend=backend)
