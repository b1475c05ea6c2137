"""The fused ops are well-formed torch.library custom ops: fake tensors, autograd, torch.compile.

Both fast backends are one custom op each (`kernels::lora_linear_torch`, `kernels::lora_linear_triton`),
so torch.compile captures a LoRA'd model whole: no graph break, with static gates and with the
straight-through tensor gates of selective LoRA, and the op in the graph. Compiled runs use the
aot_eager backend (AOTAutograd's forward and backward graphs, run eagerly): inductor works too, but
compiles for 20-40 s here with a cold cache, too long for this suite.
"""
import pytest
import torch
from timm.models.vision_transformer import Block

import kernels
from lora_cases import ON, T1, make_case

FUSED_OPS = {"torch": torch.ops.kernels.lora_linear_torch.default,
             "triton": torch.ops.kernels.lora_linear_triton.default}


def _call(case, backend):
    return kernels.lora_linear(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                               case["starts"], case["scale"], gates=case["gates"], residual=case["residual"],
                               backend=backend)


def _op_args(case, gates=()):
    return (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["starts"],
            case["scale"], list(gates), list(range(len(gates))), case["residual"])


def test_custom_op_passes_opcheck(triton_poisoned):
    case = make_case(7, 40, 4, residual=True)
    torch.library.opcheck(FUSED_OPS["triton"], _op_args(case),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("merge,gated", [(False, True), (True, False)],
                         ids=["activation-side-gate-tensor", "weight-side-static"])
def test_torch_op_passes_opcheck(monkeypatch, merge, gated):
    from kernels import _torch_path

    monkeypatch.setattr(_torch_path, "merge_pays", lambda *args: merge)
    case = make_case(7, 40, 4, residual=True)
    gates = [torch.tensor(1.0, requires_grad=True)] if gated else []
    torch.library.opcheck(FUSED_OPS["torch"], _op_args(case, gates))  # every check, AOT dispatch included


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_call_matches_eager(triton_poisoned, backend_name):
    case = make_case(7, 40, 4, residual=True)
    eager = _call(case, backend_name)
    compiled = torch.compile(lambda: _call(case, backend_name), backend="aot_eager", fullgraph=True)
    y = compiled()
    torch.testing.assert_close(y, eager)
    y.backward(case["dy"])
    assert case["lora_a"][0].grad is not None and case["x"].grad is not None


def test_tensor_gates_compile_through_the_fused_op(triton_poisoned):
    case = make_case(7, 40, 4, gates=(T1, ON))
    want = _call(case, "reference")
    y = torch.compile(lambda: _call(case, "triton"), backend="aot_eager", fullgraph=True)()
    torch.testing.assert_close(y, want)


class _LoRAQKV(torch.nn.Module):
    """timm's fused qkv with LoRA on q and v, as the adapters build it: gated (selective LoRA, a
    straight-through gate from a score per segment) or not."""

    def __init__(self, qkv, rank, backend, gated):
        super().__init__()
        d = qkv.in_features
        self.weight, self.bias, self.backend = qkv.weight, qkv.bias, backend
        self.lora_a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, d) / d ** 0.5) for _ in "qv")
        self.lora_b = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(d, rank)) for _ in "qv")
        # score 0.15 >= 0.1: on; 0.05: off (a probe)
        self.scores = torch.nn.ParameterList(torch.nn.Parameter(torch.tensor(s)) for s in (0.15, 0.05)) if gated else None

    def forward(self, x):
        gates = None
        if self.scores is not None:
            gates = [(s.detach() >= 0.1).to(s.dtype) + (s - s.detach()) for s in self.scores]
        return kernels.lora_linear(x, self.weight, self.bias, list(self.lora_a), list(self.lora_b),
                                   [0, 2 * self.weight.shape[1]], 2.0, gates=gates, backend=self.backend)


def _lora_block(backend, gated):
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, mlp_ratio=2.0)
    block.requires_grad_(False)
    block.attn.qkv = _LoRAQKV(block.attn.qkv, 4, backend, gated)
    return block


@pytest.mark.parametrize("gated", [False, True], ids=["static", "straight-through-gates"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_lora_block_is_one_graph_with_the_fused_op_and_matches_eager(triton_poisoned, backend_name, gated):
    block = _lora_block(backend_name, gated)
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    x = torch.randn(2, 5, 32, requires_grad=True)
    dy = torch.randn(2, 5, 32)
    trained = [x, *(p for p in block.parameters() if p.requires_grad)]  # LoRA A, B and the scores
    results = []
    for model in (block, torch.compile(block, backend=counting_aot_eager)):
        y = model(x)
        results.append([y.detach(), *torch.autograd.grad(y, trained, dy)])
    assert len(graphs) == 1  # a graph break would make two
    assert [node.target for node in graphs[0].graph.nodes].count(FUSED_OPS[backend_name]) == 1
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
