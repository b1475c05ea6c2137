"""Fixtures for the kernel tests: Triton in interpreter mode on the CPU, and NaN-poisoned outputs.

Triton decides between compiling and interpreting when a function is decorated with @triton.jit
(triton.knobs.runtime.interpret, read from TRITON_INTERPRET at that moment). That happens twice: when
kernels._triton_lora is imported, and when triton.language itself is imported, for its library
helpers written in Triton (tl.zeros, tl.cdiv, ...). Anything may have imported triton earlier in the
session (torch.utils.flop_counter does), so the fixture does not rely on import order: it sets the
variable, (re)imports kernels._triton_lora, and swaps triton.language's compiled helpers for
interpreted ones. On teardown it undoes all three, so nothing leaks into other packages' tests.
"""
import importlib
import os

import pytest
import torch


def _interpret_triton_language():
    """Replace the compiled @jit helpers of triton.language by interpreted ones; returns an undo list."""
    import triton.language as tl
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    undo = []
    for module in (tl, tl_standard):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                undo.append((module, name, value))
                setattr(module, name, InterpretedFunction(value.fn))
    return undo


@pytest.fixture(scope="session")
def triton_interpret():
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    undo = _interpret_triton_language()
    import kernels._triton_lora as tl_mod
    if type(tl_mod._lora_mm_kernel).__name__ != "InterpretedFunction":
        importlib.reload(tl_mod)  # imported earlier in compiled mode: decorate again, interpreted
    tl_mod._ranges_cached.cache_clear()
    yield tl_mod
    for module, name, value in undo:
        setattr(module, name, value)
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    if old in (None, "", "0"):
        importlib.reload(tl_mod)


@pytest.fixture
def triton_poisoned(triton_interpret, monkeypatch):
    """Every buffer a Triton launch writes starts as NaN, so an element the kernel skips fails."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(triton_interpret, "_empty", nan_empty)
    return triton_interpret


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """The two fast backends; 'triton' runs interpreted with poisoned outputs."""
    if request.param == "triton":
        request.getfixturevalue("triton_poisoned")
    return request.param


@pytest.fixture(params=["reference", "torch", "triton"])
def any_backend(request):
    """Every backend, the reference too; 'triton' as in `backend`."""
    if request.param == "triton":
        request.getfixturevalue("triton_poisoned")
    return request.param
