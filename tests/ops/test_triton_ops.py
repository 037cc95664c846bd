"""The triton strategy as torch ops (``sdpadiff::triton_fwd`` / ``triton_bwd``): opcheck, fullgraph
compile against eager and the float64 oracle, auto under compile, and the GPU form of the ops.

Under TRITON_INTERPRET=1 (tests/conftest.py sets it) the kernels are interpreted and the ops are
``torch.library.custom_op`` ops; with compiled kernels they are ``torch.library.triton_op`` ops.
No GPU is needed: the last tests trace the triton_op form with fake CPU tensors in a subprocess
without the interpreter, which never launches a kernel.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import subprocess
import sys
import textwrap

import pytest
import torch

from multihead_sdpadiff import choose_impl, diff_attention
from multihead_sdpadiff.ops import _prepare, get_strategy
from multihead_sdpadiff.ops import triton_fused as ft
from tests.oracle import oracle_attention

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed")


def _inputs(b=1, h=4, hkv=2, lq=19, lk=27, d=16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 2 * h, lq, d, generator=g)
    k = torch.randn(b, 2 * hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, 2 * d, generator=g)
    lam = 0.2 + 0.6 * torch.rand(h, generator=g)
    return tuple(t.requires_grad_(grad) for t in (q, k, v, lam))


def _op_args(mask_kind, causal, grad=True):
    q, k, v, lam = _inputs(grad=grad)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[..., :5] = False
    elif mask_kind == "additive":
        mask = torch.randn(lq, lk, generator=torch.Generator().manual_seed(1))
        mask[3] = float("-inf")  # a row that sees nothing
    i = _prepare(q, k, v, lam, mask, causal, None)
    lo, hi = ft.default_row_bounds(lq, lk, causal, q.device)
    return i.q, i.k, i.v, i.lam, i.mask.tensor, lo, hi, i.scale


# ---------------------------------------------------------------------------
# (a) opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind,causal", [(None, True), ("padding", True), ("additive", False)])
def test_opcheck_forward(mask_kind, causal):
    ft._register_ops()
    args = _op_args(mask_kind, causal)
    torch.library.opcheck(torch.ops.sdpadiff.triton_fwd.default, (*args, True))


def test_opcheck_forward_without_aux():
    """store_aux=False (inference under compile): o2 and lse are empty; nothing to differentiate."""
    ft._register_ops()
    args = _op_args("padding", True, grad=False)
    out, o2, lse = torch.ops.sdpadiff.triton_fwd(*args, False)
    assert o2.shape == (0,) and lse.shape == (0,) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.sdpadiff.triton_fwd.default, (*args, False))


@pytest.mark.parametrize("need_q,need_kv", [(True, True), (False, True), (True, False)])
def test_opcheck_backward(need_q, need_kv):
    ft._register_ops()
    q, k, v, lam, mask, lo, hi, scale = (a.detach() if isinstance(a, torch.Tensor) else a
                                         for a in _op_args("padding", True))
    out, o2, lse = torch.ops.sdpadiff.triton_fwd(q, k, v, lam, mask, lo, hi, scale, True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    args = (dout, q, k, v, lam, mask, lo, hi, out, o2, lse, scale, need_q, need_kv)
    dq, dk, dv, dlam = torch.ops.sdpadiff.triton_bwd(*args)
    assert dq.shape == (q.shape if need_q else (0,)) and dk.shape == (k.shape if need_kv else (0,))
    assert dv.shape == (v.shape if need_kv else (0,)) and dlam.shape == lam.shape
    torch.library.opcheck(torch.ops.sdpadiff.triton_bwd.default, args)


def test_fake_outputs_match_the_kernel_outputs():
    """The fake forward gives the real outputs' shapes, dtypes and strides, row statistics included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ft._register_ops()
    for dtype in (torch.float32, torch.float64):
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in _op_args("additive", False, grad=False)]
        real = torch.ops.sdpadiff.triton_fwd(*args, True)
        with FakeTensorMode() as mode:
            fake = torch.ops.sdpadiff.triton_fwd(
                *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args), True)
        for r, f in zip(real, fake, strict=True):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
        b, h2, lq, d = args[0].shape
        assert real[2].shape == (b, h2 // 2, 2, lq) and real[2].dtype == dtype  # lse: float64 for float64


def test_backward_of_a_forward_without_aux_refuses():
    ft._register_ops()
    args = _op_args(None, True)
    out, _, _ = torch.ops.sdpadiff.triton_fwd(*args, False)
    with pytest.raises(RuntimeError, match="store_aux=False"):
        out.sum().backward()


# ---------------------------------------------------------------------------
# (b) torch.compile(fullgraph=True): one graph, outputs and gradients equal to eager
# ---------------------------------------------------------------------------

def _counting_aot_eager():
    """aot_eager that keeps every Dynamo graph it is given (one per graph break plus one)."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


CASES = {
    "causal_gqa": dict(is_causal=True),
    "padding_mask": dict(attn_mask="padding", is_causal=True),
    "additive_mask": dict(attn_mask="additive"),
    "window": dict(is_causal=True, window=(5, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_fullgraph_matches_eager_and_the_oracle(case):
    kw = dict(CASES[case])
    q, k, v, lam = _inputs(lq=21, lk=21 if "window" in kw else 30, seed=3)
    okw = {}
    if kw.get("attn_mask") == "padding":
        m = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool)
        m[..., :4] = False
        kw["attn_mask"], okw["bool_mask"] = m, m
    elif kw.get("attn_mask") == "additive":
        m = torch.randn(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(4))
        m[2] = float("-inf")
        kw["attn_mask"], okw["add_mask"] = m, m

    def run(q, k, v, lam):
        return diff_attention(q, k, v, lam, impl="triton", **kw)

    backend, graphs = _counting_aot_eager()
    compiled = torch.compile(run, fullgraph=True, backend=backend)
    dout = torch.randn(1, 4, q.shape[2], 32, generator=torch.Generator().manual_seed(5))

    eager = run(q, k, v, lam)
    eager_grads = torch.autograd.grad(eager, (q, k, v, lam), dout)
    got = compiled(q, k, v, lam)
    got_grads = torch.autograd.grad(got, (q, k, v, lam), dout)

    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break"
    assert sum("sdpadiff.triton_fwd" in str(n.target) for n in graphs[0].graph.nodes) == 1
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lam)]
    want = oracle_attention(*leaves, causal=kw.get("is_causal", False), window=kw.get("window"), **okw)
    want_grads = torch.autograd.grad(want, leaves, dout.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)

    with torch.no_grad():  # inference: the op without auxiliary outputs, the same values
        torch.testing.assert_close(compiled(q, k, v, lam), eager, rtol=0, atol=0)


def test_compile_fullgraph_packed_sequences():
    """Packed sequences (cu_seqlens as per-row key intervals) through the compiled op. The
    boundaries are Python ints here: diff_attention_varlen reads them from a tensor, a
    data-dependent check that fullgraph refuses whatever the strategy."""
    q, k, v, lam = _inputs(lq=26, lk=26, seed=6)
    cu = (0, 7, 20, 26)

    def run(q, k, v, lam):
        inputs = _prepare(q, k, v, lam, None, True, None, None, (cu, cu))
        return get_strategy("triton")(inputs)

    backend, graphs = _counting_aot_eager()
    got = torch.compile(run, fullgraph=True, backend=backend)(q, k, v, lam)
    eager = run(q, k, v, lam)
    assert len(graphs) == 1
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    dout = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    got_grads = torch.autograd.grad(got, (q, k, v, lam), dout)
    for a, b in zip(got_grads, torch.autograd.grad(eager, (q, k, v, lam), dout), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lam)]
    lens = [b - a for a, b in zip(cu, cu[1:], strict=False)]
    want = oracle_attention(*leaves, causal=True, seqlens=(lens, lens))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves, dout.double()), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_explain_reports_no_graph_break():
    q, k, v, lam = _inputs(grad=False)
    explanation = torch._dynamo.explain(
        lambda q, k, v, lam: diff_attention(q, k, v, lam, is_causal=True, impl="triton"))(q, k, v, lam)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---------------------------------------------------------------------------
# auto under compile
# ---------------------------------------------------------------------------

def test_the_strategy_is_compilable_and_runs_inside_compile(monkeypatch):
    assert get_strategy("triton").compilable
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v, lam = _inputs(grad=False)
    assert get_strategy("triton").not_supported_reasons(_prepare(q, k, v, lam, None, True, None)) == []


def test_auto_under_compile_takes_triton_on_cuda(monkeypatch):
    """The dispatcher's view of a compiled CUDA call, without a GPU: fake CUDA tensors, and
    is_compiling() patched to True. Under the interpreter the capability check is skipped."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(s, device="cuda") for s in ((1, 8, 64, 64), (1, 4, 64, 64), (1, 2, 64, 128)))
        assert choose_impl(q, k, v, 0.5, is_causal=True)[0] == "triton"
        q48, k48, v48 = (torch.empty(s, device="cuda") for s in ((1, 8, 64, 48), (1, 4, 64, 48), (1, 2, 64, 96)))
        assert choose_impl(q48, k48, v48, 0.5, is_causal=True)[0] == "sdpa_2pass"  # head dim 48: triton refuses


# ---------------------------------------------------------------------------
# laziness and the GPU form of the ops (triton_op), traced without a GPU
# ---------------------------------------------------------------------------

def _run_python(code: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(src), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ops_are_defined_on_first_use_only():
    out = _run_python("""
        import sys, torch, multihead_sdpadiff
        from multihead_sdpadiff import diff_attention
        assert 'triton' not in sys.modules, 'triton imported eagerly'
        assert not hasattr(torch.ops.sdpadiff, 'triton_fwd'), 'op defined at import'
        q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 32)
        diff_attention(q, k, v, 0.5, impl='triton')  # eager, no gradient: the kernel directly
        assert not hasattr(torch.ops.sdpadiff, 'triton_fwd')
        diff_attention(q.requires_grad_(), k, v, 0.5, impl='triton').sum().backward()
        from multihead_sdpadiff.ops import triton_fused
        print(triton_fused._ops_kind, hasattr(torch.ops.sdpadiff, 'triton_bwd'))
    """, interpret=True)
    assert out.split() == ["custom_op", "True"]


def test_constant_marker_is_the_one_torch_uses():
    """_constant_under_compile sets assume_constant_result's marker without importing torch._dynamo."""
    probe = torch.compiler.assume_constant_result(lambda: None)
    marked = [name for name in vars(probe) if getattr(probe, name) is True]
    assert marked == ["_dynamo_marked_constant"]
    assert ft._register_ops._dynamo_marked_constant and ft._environment_reasons._dynamo_marked_constant


def test_gpu_form_is_a_triton_op_whose_graph_holds_the_kernels():
    """Without the interpreter the kernels are compiled JITFunctions and the ops triton_ops. Traced
    with fake CPU tensors (no launch, so no GPU): Dynamo keeps one op node, AOTAutograd's graph holds
    the four kernels as triton_kernel_wrapper_functional nodes, and torch finds the kernels (their
    source goes into its compile caches). Without a GPU driver torch cannot read which buffers a
    kernel writes and assumes all (it logs a warning, silenced here); a bool mask is left out
    because that assumption makes it re-view the uint8 view of the mask, which a GPU never does."""
    out = _run_python("""
        import logging, torch
        from functorch.compile import aot_function
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        from torch._library.triton import get_triton_kernels_for_op
        from multihead_sdpadiff.ops import triton_fused as ft
        logging.getLogger('torch._higher_order_ops.triton_kernel_wrap').disabled = True
        print(ft._register_ops())
        print(*[k.fn.__name__ for n in ('triton_fwd', 'triton_bwd') for k in get_triton_kernels_for_op('sdpadiff::' + n)])

        q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 1, 12, 32)
        lam, mask = torch.tensor([0.3, 0.7]), torch.zeros(1, 1, 9, 12)
        lo, hi = ft.default_row_bounds(9, 12, True, 'cpu')

        class Stop(Exception):
            pass

        graphs = []
        def capture(gm, example_inputs):
            graphs.append(gm)
            def never_run(*args):
                raise Stop
            return never_run

        def fwd_bwd(q, k, v, lam, mask, lo, hi, dout):
            out, o2, lse = torch.ops.sdpadiff.triton_fwd(q, k, v, lam, mask, lo, hi, 0.25, True)
            return torch.ops.sdpadiff.triton_bwd(dout, q, k, v, lam, mask, lo, hi, out, o2, lse, 0.25, True, True)

        args = (q, k, v, lam, mask, lo, hi, torch.randn(1, 2, 9, 32))
        for traced in (torch.compile(fwd_bwd, fullgraph=True, backend=capture), aot_function(fwd_bwd, capture)):
            try:
                traced(*args)
            except Stop:
                pass
        dynamo, aot = graphs
        print(*[str(n.target).split('.')[-1] for n in dynamo.graph.nodes if 'sdpadiff' in str(n.target)])
        print(*[kernel_side_table.get_kernel(n.kwargs['kernel_idx']).fn.__name__ for n in aot.graph.nodes
                if 'triton_kernel_wrapper_functional' in str(n.target)])
        print(any('sdpadiff' in str(n.target) for n in aot.graph.nodes))
    """, interpret=False)
    lines = out.strip().splitlines()
    assert lines[0] == "triton_op"
    kernels = ["diff_attn_fwd_kernel", "diff_attn_bwd_pre_kernel", "diff_attn_bwd_kv_kernel", "diff_attn_bwd_q_kernel"]
    assert lines[1].split() == kernels
    assert lines[2].split() == ["triton_fwd", "triton_bwd"]  # Dynamo: the ops, one node each
    assert lines[3].split() == kernels  # AOTAutograd: the kernels themselves
    assert lines[4] == "False"
