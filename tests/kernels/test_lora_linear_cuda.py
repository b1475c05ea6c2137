"""The compiled Triton kernels on a real GPU (skipped without CUDA): same checks as the interpreter."""
import pytest
import torch

from lora_cases import ON, T0, T1, assert_matches_reference, make_case, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k,r,layout,gates", [
    (1, 40, 4, "qv", (ON, ON)), (197, 768, 8, "qv", (T1, T0)), (394, 100, 64, "full", (ON,)),
    (1576, 768, 16, "qv", (ON, T1)), (7, 3072, 1, "full", (T1,))])
def test_compiled_kernels_match_reference(dtype, m, k, r, layout, gates):
    case = make_case(m, k, r, layout=layout, gates=gates, residual=True, dtype=dtype, d=256, n_full=300,
                     device="cuda")
    assert_matches_reference(case, "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_requiring_grad_gates_cause_no_host_sync(backend):
    case = make_case(197, 768, 8, layout="qv", gates=(T1, T0), residual=True, dtype=torch.bfloat16, d=256,
                     device="cuda")
    assert_matches_reference(case, backend)  # also the warm-up: kernels compiled, segment ranges cached
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(case, backend)  # forward and backward
    finally:
        torch.cuda.set_sync_debug_mode("default")
