"""The torch and Triton backends agree with the float64 reference: forward and every gradient.

Triton runs interpreted on the CPU (TRITON_INTERPRET=1) with NaN-poisoned outputs. The interpreter
tiles are 64 x 32 x 32, so K = 40 and N = 50 / 72 leave ragged tails in every dimension.
"""
import pytest
import torch

from lora_cases import OFF, ON, T0, T0_FROZEN, T1, assert_matches_reference, make_case

SHAPES = [(m, r) for m in (1, 7, 197, 394) for r in (1, 4, 8, 16, 64)]


@pytest.mark.parametrize("layout", ["qv", "full"])
@pytest.mark.parametrize("m,r", SHAPES, ids=[f"M{m}-R{r}" for m, r in SHAPES])
def test_ragged_shapes_and_ranks_match_reference(backend, m, r, layout):
    # bias and residual alternate over the grid so that every combination meets every shape class
    bias, residual = bool((m + r) % 2), bool((m // 7 + r) % 3 == 0)
    case = make_case(m, 40, r, layout=layout, bias=bias, residual=residual, seed=m * 100 + r)
    assert_matches_reference(case, backend)


GATES = [(ON, ON), (OFF, ON), (ON, OFF), (OFF, OFF), (T1, T0), (T0, T1), (T0_FROZEN, T1), (T1, T1), (T0, T0)]


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gates", GATES, ids=["-".join(g) for g in GATES])
def test_gate_patterns_on_qkv_match_reference(backend, gates, bias, residual):
    case = make_case(7, 40, 4, layout="qv", gates=gates, bias=bias, residual=residual)
    assert_matches_reference(case, backend)


@pytest.mark.parametrize("merge", [False, True], ids=["activation-side", "weight-side"])
@pytest.mark.parametrize("gates", GATES, ids=["-".join(g) for g in GATES])
def test_torch_path_both_sides_match_reference(monkeypatch, merge, gates):
    """The torch path folds the update into W or adds it to the output, by size; both, every gate pattern."""
    from kernels import _torch_path

    monkeypatch.setattr(_torch_path, "merge_pays", lambda *args: merge)
    assert_matches_reference(make_case(33, 40, 8, layout="qv", gates=gates, residual=True), "torch")
    assert_matches_reference(make_case(33, 40, 8, layout="full", gates=gates[:1]), "torch")


@pytest.mark.parametrize("gate", [ON, OFF, T1, T0, T0_FROZEN])
def test_full_width_gates_match_reference(backend, gate):
    case = make_case(197, 40, 8, layout="full", gates=(gate,), residual=True)
    assert_matches_reference(case, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,r,layout", [(7, 8, "qv"), (197, 64, "qv"), (394, 16, "full"), (1, 1, "full")])
def test_half_precision_matches_reference(backend, dtype, m, r, layout):
    case = make_case(m, 40, r, layout=layout, gates=(T1, ON), residual=True, dtype=dtype)
    assert_matches_reference(case, backend)


def test_leading_dims_are_kept(backend):
    case = make_case(0, 40, 4, lead=(2, 5, 3), residual=True)
    assert_matches_reference(case, backend)


@pytest.mark.parametrize("fuse", [True, False], ids=["xa-in-loop", "xa-precomputed"])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_triton_forward_variants_match_reference(triton_poisoned, monkeypatch, fuse, r):
    monkeypatch.setitem(triton_poisoned.FUSE_XA, "interpret", fuse)
    case = make_case(197, 40, r, layout="qv", residual=True, gates=(T1, ON))
    assert_matches_reference(case, "triton")


def test_triton_rank_128_per_segment(triton_poisoned):
    case = make_case(7, 40, 128, layout="qv")  # R_tot = 256: the unfused path with a rank loop
    assert_matches_reference(case, "triton")
