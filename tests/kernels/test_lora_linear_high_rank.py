"""Ranks 64 and 128 (the Selective LoRA paper's) and kernels.MAX_RANK through the Triton kernels,
interpreted (TRITON_INTERPRET=1, NaN-poisoned outputs), against the float64 reference: LoRA (static
gates) and selective LoRA (straight-through tensor gates), one segment and two. Then the GPU launch
configurations themselves (tiles, the precomputed-L rank walk, the x A^T column tiles, the fused-rank
limit of each architecture) run under the interpreter: the choices kernels/_aot.py checks for
resources compute the same numbers."""
import pytest
import torch

from kernels import MAX_RANK
from lora_cases import ON, T0, T1, assert_matches_reference, make_case

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["full", "qv"])
@pytest.mark.parametrize("r", [64, 128])
def test_lora_at_ranks_64_and_128_matches_reference(triton_poisoned, r, layout, dtype):
    case = make_case(33, 40, r, layout=layout, bias=True, residual=layout == "qv", dtype=dtype, seed=r)
    assert_matches_reference(case, "triton")


@pytest.mark.parametrize("r", [64, 128])
def test_selective_lora_gates_at_ranks_64_and_128_match_reference(triton_poisoned, r):
    case = make_case(33, 40, r, layout="qv", gates=(T1, T0), residual=True, seed=r + 1)
    assert_matches_reference(case, "triton")


def test_the_largest_rank_matches_reference(triton_poisoned):
    assert_matches_reference(make_case(7, 40, MAX_RANK, layout="full", residual=True), "triton")


@pytest.fixture(params=["hopper", "ampere"])
def gpu_choices(request, triton_poisoned, monkeypatch):
    """The interpreter launches with an architecture's configs and limits instead of its own."""
    arch, mod = request.param, triton_poisoned
    for cls in ("16-bit", "tf32", "fp32"):
        monkeypatch.setitem(mod.CONFIGS, ("interpret", cls), mod.CONFIGS[(arch, cls)])
        monkeypatch.setitem(mod.MAX_FUSED_RANK, ("interpret", cls),
                            mod.MAX_FUSED_RANK.get((arch, cls), mod.DEFAULT_MAX_FUSED_RANK))
    monkeypatch.setitem(mod.BUFFER_BLOCK_R, "interpret", mod.BUFFER_BLOCK_R[arch])
    monkeypatch.setitem(mod.XA_BLOCK_P, "interpret", mod.XA_BLOCK_P[arch])
    return arch


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [8, 32, 128])
def test_gpu_launch_configs_match_reference_under_the_interpreter(gpu_choices, r, dtype):
    # qv: R_tot = 16 (fused everywhere), 64 (fused, or precomputed for plain fp32), 256 (precomputed)
    case = make_case(197, 40, r, layout="qv", gates=(T1, ON), bias=True, residual=True, dtype=dtype, seed=r)
    assert_matches_reference(case, "triton")
