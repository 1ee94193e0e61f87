"""mmkit_kernels: every Triton kernel under the CPU interpreter against its torch reference, the
torch references against plain torch, and the MMKIT_KERNELS dispatch.

Interpreter tests (marker ``interpreter``) need ``TRITON_INTERPRET=1`` set *before* triton is
first imported: Triton's standard library (``tl.sum``, ``tl.max``, ``tl.cdiv``...) is
``@triton.jit``-decorated at import time and stays compiled-mode otherwise. Setting it here would
be too late whenever another test module imported triton first, and would switch every Triton
user in the session (e.g. inductor on a GPU box) to the interpreter. So in a normal run they are
skipped in-process and ``test_triton_interpreter_suite`` runs them in one child pytest with
``TRITON_INTERPRET=1`` (its output is shown on failure). Run them directly with
``TRITON_INTERPRET=1 pytest tests/test_kernels.py -m interpreter``.

Shapes are tiny and ragged (the interpreter costs ~1 ms per program instance). bf16 cases are
"bf16 storage, fp32 dot": the interpreter's bf16 ``tl.dot`` is wrong, so the kernels upcast
there (``DOT_F32``); true bf16 MMA needs a GPU run.

Tolerances (kernel in dtype vs the torch reference run in fp32 on the same rounded inputs;
``atol = tol * max(1, max|ref|)``, ``rtol = tol``): fp32 1e-4, fp16 1e-2, bf16 5e-2.
The merge is pure data movement: forward ``torch.equal`` (against mmkit's torch path and HF's
masked_scatter); feature grads ``torch.equal``; embedding-table grads (fp32 atomics,
order-dependent) within the tolerances above against an fp32 index_add oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkit_kernels import dispatch
from mmkit_kernels.flce import fused_linear_cross_entropy, linear_cross_entropy_reference
from mmkit_kernels.merge import merge_image_features, merge_image_features_torch
from mmkit_kernels.projector import (
    linear_projector_torch,
    mlp_gelu_projector_torch,
    project,
)

try:
    import triton

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def _interpreter_ready() -> bool:
    """True in a process where triton was imported with TRITON_INTERPRET=1 (the child run)."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


INTERPRETER_READY = _interpreter_ready()

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    expected = expected.float()
    atol = tol * max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _reset_mode():
    dispatch.set_kernel_mode(None)
    yield
    dispatch.set_kernel_mode(None)


@pytest.fixture
def interp(monkeypatch):
    """Triton kernels via the CPU interpreter (only in the interpreter-ready child process)."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    if not INTERPRETER_READY:
        pytest.skip("interpreter tests run in a child process: see test_triton_interpreter_suite")
    monkeypatch.delenv("MMKIT_KERNELS", raising=False)
    dispatch.set_kernel_mode("triton")
    yield


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.skipif(INTERPRETER_READY, reason="already running the interpreter tests in this process")
def test_triton_interpreter_suite():
    """All ``interpreter`` tests, in a child pytest with TRITON_INTERPRET=1 from the start."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMKIT_KERNELS", "PYTEST_ADDOPTS")}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-m", "interpreter", "-q",
           "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-20000:]
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).requires_grad_()


def _f32(ts):
    return [None if t is None else t.detach().float().requires_grad_() for t in ts]


def _grads(out, inputs, gout):
    live = [t for t in inputs if t is not None]
    gs = iter(torch.autograd.grad(out, live, gout))
    return [None if t is None else next(gs) for t in inputs]


# --------------------------------------------------------------------------------------------
# projector

PROJ_SHAPES = [(1, 8, 12, 5), (37, 24, 40, 19), (70, 33, 80, 65)]  # (M, K, N1, N2), none a block multiple


def _proj_params(M, K, N1, N2, dtype, bias=True, lead=()):
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = _leaf(torch.randn(*lead, M, K, generator=g), dtype)
    w1 = _leaf(torch.randn(N1, K, generator=g) / K**0.5, dtype)
    b1 = _leaf(torch.randn(N1, generator=g), dtype) if bias else None
    w2 = _leaf(torch.randn(N2, N1, generator=g) / N1**0.5, dtype)
    b2 = _leaf(torch.randn(N2, generator=g), dtype) if bias else None
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_projector_triton_matches_torch(kind, shape, dtype):
    params = _proj_params(*shape, dtype)
    if kind == "linear":
        params = params[:3]
        ref_fn = linear_projector_torch
    else:
        ref_fn = mlp_gelu_projector_torch
    y = project(*params)
    assert dispatch.last_path("projector") == "triton"
    assert y.dtype == dtype and y.shape == (shape[0], params[1].shape[0] if kind == "linear" else shape[3])
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = _grads(y, params, gout)
    ref_params = _f32(params)
    y_ref = ref_fn(*ref_params)
    ref_grads = _grads(y_ref, ref_params, gout.float())
    tol = TOL[dtype]
    close(y, y_ref, tol, "forward")
    for name, g, gr in zip(["x", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert g.dtype == dtype
        close(g, gr, tol, f"grad {name}")


@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_projector_triton_no_bias_batched_and_frozen():
    x, w1, _, w2, _ = _proj_params(5, 20, 36, 17, torch.float32, bias=False, lead=(3,))
    y = project(x, w1, None, w2, None)
    assert dispatch.last_path("projector") == "triton" and y.shape == (3, 5, 17)
    close(y, mlp_gelu_projector_torch(x, w1, None, w2, None), 1e-4)
    # Frozen weights (LLaVA stage 2 style for some params): only dx is produced.
    w1f, w2f = w1.detach(), w2.detach()
    (dx,) = torch.autograd.grad(project(x, w1f, None, w2f, None).sum(), [x])
    (dx_ref,) = torch.autograd.grad(mlp_gelu_projector_torch(x, w1f, None, w2f, None).sum(), [x])
    close(dx, dx_ref, 1e-4)
    # Linear without bias, inference (no grad): pre-activation is not stored.
    with torch.no_grad():
        close(project(x, w1), F.linear(x, w1), 1e-4)


def test_project_torch_reference_and_args():
    x, w1, b1, w2, b2 = _proj_params(4, 6, 10, 3, torch.float32)
    close(project(x, w1, b1, w2, b2), F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), 1e-6)
    assert dispatch.last_path("projector") == "torch"
    close(project(x, w1, b1), F.linear(x, w1, b1), 1e-6)
    with pytest.raises(ValueError):
        project(x, w1, b1, None, b2)


# --------------------------------------------------------------------------------------------
# merge

IMG = 7
VOCAB = 20


def _merge_case(B, T, n_img, H, dtype, feat_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    ids[ids == IMG] = IMG + 1
    flat = ids.view(-1)
    pos = torch.randperm(B * T, generator=g)[:n_img]
    flat[pos] = IMG
    table = _leaf(torch.randn(VOCAB, H, generator=g), dtype)
    feats = _leaf(torch.randn(n_img, H, generator=g), feat_dtype or dtype)
    return ids, table, feats


def _hf_merge(ids, table, feats):
    """Hugging Face Llava's merge: [T, H] boolean mask + masked_scatter."""
    emb = F.embedding(torch.where(ids == IMG, 0, ids), table)
    mask = (ids == IMG).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, feats.to(emb.dtype))


MERGE_CASES = [
    # (B, T, n_img, H, block_h): H not a multiple of the column block, several column blocks
    (2, 13, 5, 40, 16),
    (1, 9, 9, 24, None),  # all image tokens
    (3, 5, 0, 24, None),  # no image tokens
    (1, 1, 0, 8, None),  # one text token
    (1, 1, 1, 8, None),  # one image token
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: "B{}T{}n{}H{}".format(*c[:4]))
@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_merge_triton_matches_torch(case, dtype):
    from mmkit_kernels.merge_triton import merge_image_features_triton

    B, T, n_img, H, block_h = case
    feat_dtype = torch.float32 if dtype == torch.bfloat16 else None  # features cast to the table dtype
    ids, table, feats = _merge_case(B, T, n_img, H, dtype, feat_dtype=feat_dtype)
    if block_h is None:
        out = merge_image_features(ids, table, feats, IMG)
        assert dispatch.last_path("merge") == "triton"
    else:
        out = merge_image_features_triton(ids, table, feats, IMG, block_h=block_h)
    ref_table, ref_feats = table.detach().requires_grad_(), feats.detach().requires_grad_()
    ref = merge_image_features_torch(ids, ref_table, ref_feats, IMG)
    assert out.shape == (B, T, H) and out.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(out, _hf_merge(ids, table.detach(), feats.detach()))

    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    g_table, g_feats = torch.autograd.grad(out, [table, feats], gout)
    r_table, r_feats = torch.autograd.grad(ref, [ref_table, ref_feats], gout, allow_unused=True)
    if r_feats is None:  # the torch path skips index_copy_ when there are no features
        r_feats = torch.zeros_like(ref_feats)
    assert g_feats.dtype == feats.dtype and torch.equal(g_feats, r_feats)
    # The fp32 oracle for the table: sum of the text rows' gradients per token id.
    text = (ids != IMG).view(-1)
    oracle = torch.zeros(VOCAB, H).index_add_(0, ids.view(-1)[text], gout.view(-1, H)[text].float())
    assert g_table.dtype == dtype
    close(g_table, oracle, TOL[dtype], "grad table")
    close(r_table, oracle, TOL[dtype], "reference grad table")


@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_merge_triton_none_features_frozen_table_and_mismatch():
    from mmkit_kernels.merge_triton import merge_image_features_triton

    ids, table, _ = _merge_case(2, 6, 0, 12, torch.float32)
    out = merge_image_features(ids, table.detach(), None, IMG)
    assert dispatch.last_path("merge") == "triton"
    assert torch.equal(out, F.embedding(ids, table.detach()))
    # Frozen embedding table (the usual LLaVA setup): only the features get a gradient.
    ids, table, feats = _merge_case(1, 10, 4, 12, torch.float32, seed=5)
    out = merge_image_features(ids.int(), table.detach(), feats, IMG)
    (gf,) = torch.autograd.grad(out, [feats], torch.ones_like(out))
    assert torch.equal(gf, torch.ones_like(feats))
    # Count mismatch: the dispatcher refuses on the host; unchecked, the kernel stays in bounds
    # and writes zeros for placeholders beyond the last feature row.
    with pytest.raises(ValueError, match="do not match"):
        merge_image_features(ids, table, feats[:3], IMG)
    out = merge_image_features_triton(ids, table.detach(), feats.detach()[:3], IMG)
    last = (ids.view(-1) == IMG).nonzero()[-1].item()
    assert torch.equal(out.view(-1, 12)[last], torch.zeros(12))


def test_merge_torch_matches_hf_and_checks_counts():
    ids, table, feats = _merge_case(2, 11, 6, 16, torch.float32, seed=2)
    out = merge_image_features(ids, table, feats, IMG)
    assert dispatch.last_path("merge") == "torch"
    ref = _hf_merge(ids, table, feats)
    assert torch.equal(out, ref)
    gout = torch.randn(out.shape)
    for a, b in zip(torch.autograd.grad(out, [table, feats], gout), torch.autograd.grad(ref, [table, feats], gout)):
        close(a, b, 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        merge_image_features(ids, table, feats[:5], IMG)
    with pytest.raises(ValueError, match="do not match"):
        merge_image_features(ids, table, None, IMG)
    # No image tokens and no features, and the n = 0 feature tensor.
    ids0 = torch.tensor([[1, 2, 3]])
    assert torch.equal(merge_image_features(ids0, table, None, IMG), F.embedding(ids0, table))
    assert torch.equal(merge_image_features(ids0, table, feats[:0], IMG), F.embedding(ids0, table))


# --------------------------------------------------------------------------------------------
# fused linear cross-entropy


def _flce_case(N, H, V, dtype, n_ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = _leaf(torch.randn(N, H, generator=g), dtype)
    w = _leaf(torch.randn(V, H, generator=g) / H**0.5, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_flce_torch_matches_cross_entropy(chunk):
    h, w, y = _flce_case(19, 16, 37, torch.float32, n_ignored=7)
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert dispatch.last_path("flce") == "torch"
    plain = F.cross_entropy(h @ w.T, y)  # ignore_index=-100 is F.cross_entropy's default
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(loss, [h, w]), torch.autograd.grad(plain, [h, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)


def test_flce_torch_batched_sum_nograd_and_lowp():
    h, w, y = _flce_case(12, 8, 29, torch.float32, n_ignored=4, seed=1)
    h3, y3 = h.detach().view(3, 4, 8).requires_grad_(), y.view(3, 4)
    s = fused_linear_cross_entropy(h3, w, y3, chunk_size=2, reduction="sum")
    ref = F.cross_entropy(h3.reshape(-1, 8) @ w.T, y, reduction="sum")
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-5)
    (gh,) = torch.autograd.grad(s * 2.5, [h3])  # backward scales by the incoming gradient
    (gr,) = torch.autograd.grad(ref * 2.5, [h3])
    torch.testing.assert_close(gh, gr, atol=1e-5, rtol=5e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, y), F.cross_entropy(h @ w.T, y))
    # bf16 storage on the torch path vs the fp32 oracle; loss is float32 like HF's upcast loss.
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lb = fused_linear_cross_entropy(hb, wb, y, chunk_size=5)
    assert lb.dtype == torch.float32
    hf, wf = _f32([hb, wb])
    lf = linear_cross_entropy_reference(hf, wf, y)
    close(lb, lf, TOL[torch.bfloat16], "bf16 loss")
    for a, b in zip(torch.autograd.grad(lb, [hb, wb]), torch.autograd.grad(lf, [hf, wf])):
        close(a, b, TOL[torch.bfloat16], "bf16 grad")


def test_flce_edge_cases_torch():
    h, w, y = _flce_case(6, 8, 11, torch.float32, n_ignored=6)
    loss = fused_linear_cross_entropy(h, w, y)  # nothing supervised: 0, not NaN, with a graph
    assert loss.item() == 0.0 and loss.requires_grad
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert not gh.any() and not gw.any()
    y1 = torch.full((6,), -100)
    y1[4] = 3  # one supervised token
    loss = fused_linear_cross_entropy(h, w, y1)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, y1))
    y1[4] = 11
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(h, w, y1)
    y1[4] = 3
    loss = fused_linear_cross_entropy(h, w, y1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "case",
    [(13, 24, 50, 4, 5, None), (9, 16, 77, 0, 4, 16), (1, 8, 9, 0, None, None)],  # (N, H, V, ignored, chunk, block_v)
    ids=["ragged", "multi-vblock", "one-token"],
)
@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_flce_triton_matches_reference(case, dtype, monkeypatch):
    from mmkit_kernels import flce_triton

    N, H, V, n_ignored, chunk, block_v = case
    if block_v is not None:  # force the online-softmax loop over several vocab blocks
        orig = flce_triton.cross_entropy_inplace_triton
        monkeypatch.setattr(
            flce_triton, "cross_entropy_inplace_triton", lambda *a, **k: orig(*a, block_v=block_v, **k)
        )
    h, w, y = _flce_case(N, H, V, dtype, n_ignored, seed=N)
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert dispatch.last_path("flce") == "triton"
    gh, gw = torch.autograd.grad(loss, [h, w])
    hf, wf = _f32([h, w])
    ref = linear_cross_entropy_reference(hf, wf, y)
    rh, rw = torch.autograd.grad(ref, [hf, wf])
    tol = TOL[dtype]
    close(loss, ref, tol, "loss")
    assert gh.dtype == dtype and gw.dtype == dtype
    close(gh, rh, tol, "grad hidden")
    close(gw, rw, tol, "grad weight")


@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_flce_triton_zero_supervised_and_nograd():
    h, w, y = _flce_case(5, 8, 10, torch.float32, n_ignored=5)
    loss = fused_linear_cross_entropy(h, w, y)
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert torch.isfinite(gh).all() and not gh.any() and not gw.any()
    h, w, y = _flce_case(7, 8, 10, torch.float32, n_ignored=2)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=2)
    assert dispatch.last_path("flce") == "triton"
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ w.detach().T, y), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# dispatch


def _run_all_ops():
    ids, table, feats = _merge_case(1, 6, 2, 8, torch.float32)
    merge_image_features(ids, table, feats, IMG)
    x, w1, b1, w2, b2 = _proj_params(3, 16, 16, 16, torch.float32)
    project(x, w1, b1, w2, b2)
    h, w, y = _flce_case(4, 8, 10, torch.float32, n_ignored=1)
    fused_linear_cross_entropy(h, w, y)
    return {op: dispatch.last_path(op) for op in ("merge", "projector", "flce")}


@pytest.mark.interpreter  # also in the child, where Triton really could run
def test_dispatch_torch_env_forces_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton could run, but the user said torch
    monkeypatch.setenv("MMKIT_KERNELS", "torch")
    dispatch.set_kernel_mode(None)
    assert dispatch.kernel_mode() == "torch"
    assert set(_run_all_ops().values()) == {"torch"}


@pytest.mark.interpreter  # also in the child, where Triton really could run
def test_dispatch_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MMKIT_KERNELS", "auto")
    assert set(_run_all_ops().values()) == {"torch"}
    monkeypatch.setenv("MMKIT_KERNELS", "bogus")
    with pytest.raises(ValueError):
        dispatch.kernel_mode()


def test_dispatch_triton_without_interpreter_falls_back_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MMKIT_KERNELS", "triton")
    assert set(_run_all_ops().values()) == {"torch"}


@pytest.mark.usefixtures("interp")
@pytest.mark.interpreter
def test_dispatch_triton_under_interpreter():
    assert set(_run_all_ops().values()) == {"triton"}


# --------------------------------------------------------------------------------------------
# compiled mode, without a GPU: the interpreter accepts code the compiler rejects (e.g. plain
# Python globals inside a kernel), so lower every kernel to PTX for an sm_80 target too.


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.skipif(INTERPRETER_READY, reason="compiled-mode lowering needs a non-interpreter process")
def test_kernels_lower_to_ptx_for_sm80(tmp_path, monkeypatch):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as e:  # pragma: no cover - other Triton versions
        pytest.skip(f"Triton's AOT API moved: {e}")
    from mmkit_kernels import flce_triton, merge_triton, projector_triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # always really compile
    target = GPUTarget("cuda", 80, 32)

    def lower(lazy, sig, consts):
        fn = JITFunction(lazy.fn)
        full = {n: "constexpr" if n in consts else sig[n] for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, full, consts), target=target)
        assert ".entry" in kernel.asm["ptx"], lazy.__name__

    i32 = "i32"
    mm_sig = {n: "*bf16" for n in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "h_ptr")}
    mm_sig.update({n: i32 for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                    "stride_cm", "stride_cn", "stride_hm", "stride_hn")})
    for epilogue, b_gelu in ((0, False), (1, False), (2, False), (0, True)):
        lower(projector_triton._mm, mm_sig, dict(
            HAS_BIAS=True, EPILOGUE=epilogue, STORE_H=epilogue == 1, B_GELU=b_gelu, DOT_F32=False,
            PRECISION=None, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8))
    lower(projector_triton._mm, {**mm_sig, **{n: "*fp32" for n in mm_sig if n.endswith("_ptr")}}, dict(
        HAS_BIAS=False, EPILOGUE=0, STORE_H=False, B_GELU=False, DOT_F32=False, PRECISION="ieee",
        BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8))
    common = {"ids_ptr": "*i64", "csum_ptr": "*i32", "H": i32, "n_feat": i32, "last_feat": i32,
              "image_token_id": "i64"}
    lower(merge_triton._merge_fwd, {**common, "table_ptr": "*bf16", "feat_ptr": "*bf16", "out_ptr": "*bf16",
                                    "stride_t": i32, "stride_f": i32, "stride_o": i32}, dict(BLOCK_H=1024))
    lower(merge_triton._merge_bwd, {**common, "gout_ptr": "*bf16", "gtable_ptr": "*fp32", "gfeat_ptr": "*bf16",
                                    "stride_go": i32, "stride_gt": i32, "stride_gf": i32},
          dict(WANT_TABLE=True, WANT_FEAT=True, BLOCK_H=1024))
    lower(flce_triton._ce, {"logits_ptr": "*bf16", "stride_row": i32, "labels_ptr": "*i64", "loss_ptr": "*fp32",
                            "V": i32, "scale": "fp32"}, dict(WRITE_GRAD=True, BLOCK_V=4096))


# --------------------------------------------------------------------------------------------
# end to end: one training step of a tiny VisionLanguageModel, kernels on vs off


@pytest.mark.interpreter
def test_tiny_model_training_step_kernels_on_vs_off(interp):
    import copy

    import mmkit

    torch.manual_seed(0)
    tiny = ["model.vision.config={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,"
            " num_attention_heads: 2, image_size: 16, patch_size: 8}",
            "model.llm.config={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}"]
    base = mmkit.build("recipes/tiny.yaml", tiny)
    base.requires_grad_(True)
    n = base.vision.num_tokens
    ids = torch.tensor([[1] + [base.image_token_id] * n + [7, 9, 11, 2]])
    labels = ids.clone()
    labels[:, : n + 2] = -100
    pixels = torch.randn(1, 3, 16, 16)

    def step(mode):
        model = copy.deepcopy(base)
        dispatch.set_kernel_mode(mode)
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels, return_logits=False).loss
        loss.backward()
        paths = {op: dispatch.last_path(op) for op in ("merge", "projector", "flce")}
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, paths

    loss_t, grads_t, paths_t = step("triton")
    loss_r, grads_r, paths_r = step("torch")
    assert set(paths_t.values()) == {"triton"} and set(paths_r.values()) == {"torch"}
    close(loss_t, loss_r, 1e-5, "loss")
    assert grads_t.keys() == grads_r.keys() and len(grads_t) > 10
    for k in grads_r:
        close(grads_t[k], grads_r[k], 1e-4, k)
