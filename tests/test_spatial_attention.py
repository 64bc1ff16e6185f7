"""spatial_attention (out and the similarity LSE) and the SpatialSelfAttention block: every backend
against the dense reference with random upstream gradients for both outputs, odd lengths, head
dims 8-128, extreme logits, float64 gradcheck of every op output, the low-precision rule, the
block end to end with the loss (no n x n tensor saved), and bad inputs."""
import pytest
import torch

import attenscribble_ops as A
from attenscribble_ops.nn import AttentiveSimilarityLoss, SpatialSelfAttention
from attenscribble_ops.testing import loss_backend_for, runnable_backends

FUSED = [b for b in runnable_backends("spatial_attention", "cpu", torch.float32) if b != "reference"]
OPS = torch.ops.attenscribble_ops


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _inputs(shape, dv=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    k = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    v = torch.randn(shape[:3] + (dv or shape[3],), generator=g, dtype=torch.float64)
    return q, k, v


def _run(backend, dtype, q, k, v, logit_scale, dout=None, dlse=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = A.spatial_attention(*leaves, logit_scale=logit_scale, backend=backend)
    total = 0
    if dout is not None:
        total = total + (out.double() * dout).sum()
    if dlse is not None:
        total = total + (lse.double() * dlse).sum()
    total.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def _compare(got, want, dtype):
    rtol, atol = (1e-9, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if w is None:  # the reference's lse does not depend on v; a fused op may return zeros for it
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * w.abs().max().item(), msg=name)


def _assert_within_twice_the_reference(got, own, exact, slack):
    """Each output's and gradient's error against float64 at most twice the reference's own in the
    same dtype, plus ``slack`` times the output's scale."""
    for name, g, r, e in zip(("out", "lse", "dq", "dk", "dv"), got, own, exact):
        err, ref_err = (g.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + slack * e.abs().max().item(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


SHAPES = [((2, 3, 37, 16), None), ((1, 2, 50, 24), 8), ((1, 1, 300, 64), None), ((1, 1, 65, 128), None)]


# the Triton interpreter runs the long sequence once, with both gradients
MATCH_CASES = [(b, c, g) for b in FUSED for c in range(len(SHAPES)) for g in ("both", "out", "lse")
               if not (b == "triton" and SHAPES[c][0][2] > 100 and g != "both")]


@pytest.mark.parametrize("backend, case, grads", MATCH_CASES)
def test_matches_reference(backend, case, grads):
    shape, dv = SHAPES[case]
    q, k, v = _inputs(shape, dv, seed=case)
    dout = torch.randn(shape[:3] + (dv or shape[3],), dtype=torch.float64) if grads != "lse" else None
    dlse = torch.randn(shape[:3], dtype=torch.float64) if grads != "out" else None
    want = _run("reference", torch.float64, q, k, v, 1.3, dout, dlse)
    got = _run(backend, _dtype_for(backend), q, k, v, 1.3, dout, dlse)
    _compare(got, want, _dtype_for(backend))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("logit_scale", [0.0, -0.6])
def test_zero_and_negative_logit_scale(backend, logit_scale):
    q, k, v = _inputs((1, 2, 19, 16), seed=3)
    dlse = torch.randn(1, 2, 19, dtype=torch.float64)
    dout = torch.randn(1, 2, 19, 16, dtype=torch.float64)
    want = _run("reference", torch.float64, q, k, v, logit_scale, dout, dlse)
    got = _run(backend, _dtype_for(backend), q, k, v, logit_scale, dout, dlse)
    _compare(got, want, _dtype_for(backend))


@pytest.mark.skipif("triton" not in FUSED, reason="needs the Triton interpreter")
@pytest.mark.parametrize("logit_scale", [1.3, -0.6, 0.0])
@pytest.mark.parametrize("dv", [None, 8])
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
def test_triton_tiles_dividing_the_tokens(monkeypatch, logit_scale, dv, gpu_tiles):
    """Every tile full (64 tokens in the interpreter's 32 x 32 tiles, 256 in the GPU's, with its
    code path: split tf32x3 products, computed exactly here), the kernels' path without row and
    key masks, with and without column masks (Dv = 8 is narrower than its tile), the similarity's
    running maximum shared with the attention's (logit_scale > 0) or its own."""
    from attenscribble_ops.triton import spatial_attention as kernels

    if gpu_tiles:
        monkeypatch.setattr(kernels._target, "for_gpu", lambda t: True)
    n = 256 if gpu_tiles else 64
    shape = (2, 2, n, 16)
    q, k, v = _inputs(shape, dv, seed=5)
    assert all(kernels._even(cfg, n) for cfg in kernels._configs(q.float(), 16, dv or 16))
    assert not kernels._even(kernels._configs(q.float(), 16, dv or 16)[0], n - 1)
    dout = torch.randn(shape[:3] + (dv or 16,), dtype=torch.float64)
    dlse = torch.randn(shape[:3], dtype=torch.float64)
    want = _run("reference", torch.float64, q, k, v, logit_scale, dout, dlse)
    got = _run("triton", torch.float32, q, k, v, logit_scale, dout, dlse)
    _compare(got, want, torch.float32)


@pytest.mark.skipif("triton" not in FUSED, reason="needs the Triton interpreter")
@pytest.mark.parametrize("where", ["q", "k"])
def test_triton_infinite_inputs_on_the_gpu_path_give_nan(monkeypatch, where):
    """The GPU path's fp32 products split each operand into TF32 parts (inf - inf = NaN in the
    small part), so an infinite q value makes its query's output and LSEs NaN, and an infinite k
    value every query's (each attends to that key); the other queries' stay finite (README, NaN
    policy). The interpreter's own path multiplies unsplit."""
    from attenscribble_ops.triton import spatial_attention as kernels

    monkeypatch.setattr(kernels._target, "for_gpu", lambda t: True)
    q, k, v = (t.float() for t in _inputs((1, 1, 40, 16), seed=4))
    (q if where == "q" else k)[0, 0, 3, 5] = float("inf")
    out, lse = A.spatial_attention(q, k, v, backend="triton")
    bad = torch.zeros(40, dtype=torch.bool)
    bad[3 if where == "q" else slice(None)] = True
    assert torch.isnan(out[0, 0, bad]).all() and torch.isnan(lse[0, 0, bad]).all()
    assert torch.isfinite(out[0, 0, ~bad]).all() and torch.isfinite(lse[0, 0, ~bad]).all()


@pytest.mark.skipif("triton" not in FUSED, reason="needs the Triton interpreter")
def test_triton_tiles_from_the_environment(monkeypatch):
    """ATTENSCRIBBLE_TRITON_ATTENTION_TILES sets the GPU tiles of the three kernels (tuning runs);
    they run (here through the interpreter with the GPU's code path) and match the reference; a
    malformed value is a ValueError naming the variable."""
    from attenscribble_ops.triton import spatial_attention as kernels

    monkeypatch.setattr(kernels._target, "for_gpu", lambda t: True)
    monkeypatch.setenv(kernels.TILES_VARIABLE, "32x16x4,16x32x2,32x32x4x1")
    shape = (1, 2, 40, 16)
    q, k, v = _inputs(shape, seed=9)
    fwd, dq, dkdv = kernels._configs(q.float(), 16, 16)
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["num_warps"]) == (32, 16, 4)
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == (16, 32, 2) and "num_stages" not in dq
    assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"], dkdv["num_warps"], dkdv["num_stages"]) == (32, 32, 4, 1)
    dout, dlse = torch.randn(shape, dtype=torch.float64), torch.randn(shape[:3], dtype=torch.float64)
    want = _run("reference", torch.float64, q, k, v, 1.3, dout, dlse)
    _compare(_run("triton", torch.float32, q, k, v, 1.3, dout, dlse), want, torch.float32)
    for bad in ("64x32x4", "64x32x4,64x32x4,32x32", "48x32x4,64x32x4,32x32x8", "8x32x4,64x32x4,32x32x8",
                "ax32x4,64x32x4,32x32x8", "64x32x4,64x32x0,32x32x8"):
        monkeypatch.setenv(kernels.TILES_VARIABLE, bad)
        with pytest.raises(ValueError, match=kernels.TILES_VARIABLE):
            kernels._configs(q.float(), 16, 16)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_scale", [1.3, -0.6])
@pytest.mark.parametrize("heads", [2, 1])
def test_cpu_long_sequence_spans_key_blocks(dtype, logit_scale, heads):
    """n = 2348: two key blocks of the CPU tiles (2048 keys each, the second partial) and a partial
    last query tile, with the largest logits in the second block, so the running maxima, the
    rescaled sums and the rescaled partial output of the online softmax all matter. One head: a
    single slice, whose backward cuts every product into chunks spread over the threads."""
    q, k, v = _inputs((1, heads, 2348, 16), dv=8, seed=11)
    k[..., 2100:, :] *= 2.5
    dout = torch.randn(1, heads, 2348, 8, dtype=torch.float64)
    dlse = torch.randn(1, heads, 2348, dtype=torch.float64)
    want = _run("reference", torch.float64, q, k, v, logit_scale, dout, dlse)
    got = _run("cpu", dtype, q, k, v, logit_scale, dout, dlse)
    _compare(got, want, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_extreme_logits_do_not_overflow(backend):
    """Logits near +-1e4: the LSEs equal the row maximum (plus log of its multiplicity), finite."""
    q, k, v = _inputs((1, 1, 40, 16), seed=4)
    scale = (1e4 / (q @ k.transpose(-1, -2)).abs().max()) ** 0.5
    q, k = q * scale, k * scale
    dtype = _dtype_for(backend)
    for sign in (1.0, -1.0):
        out, lse = A.spatial_attention((sign * q).to(dtype), k.to(dtype), v.to(dtype), backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        exact = torch.logsumexp(sign * q @ k.transpose(-1, -2), -1)
        torch.testing.assert_close(lse.double(), exact, rtol=1e-3 if dtype == torch.float32 else 1e-12, atol=0.0)


# "aten" is left out: torch's SDPA rounds its exponents its own way (README, Large logit scales)
LARGE_SCALE_CASES = [("cpu", b) for b in FUSED if b != "aten"]
LARGE_SCALE_CASES += [("cuda", b) for b in ("cuda", "triton")
                      if torch.cuda.is_available() and b in runnable_backends("spatial_attention", "cuda")]


@pytest.mark.parametrize("device, backend", LARGE_SCALE_CASES)
@pytest.mark.parametrize("logit_scale", [30.0, -12.0, 1e2, 1e4, -1e4, 1e10])
def test_large_logit_scales_within_twice_the_fp32_reference(device, backend, logit_scale, monkeypatch):
    """Similarity logits s q.k of a few hundred up to ~1e11 in fp32: out, lse and every gradient within
    twice the fp32 reference's own error against float64, and finite.
    * The exponents are rounded products minus the LSE (no FMA; mul_rn on the GPU): for a row's
      maximum they cancel to 0, as in the reference. Fused into one FMA (what GCC did in the C++
      kernels' AVX2/AVX-512 clones), the C++ dq had 3 times the reference's error at s = 1e2,
      14000 times at 1e4, and was NaN at 1e10.
    * Triton's backward scales the exponent to base 2 after the subtraction: scaling logits and LSE
      to base 2 separately rounded them apart (dq, dk 5.9 and 4.3 times that error at s = 30)."""
    monkeypatch.setattr(A.backends, "triton_fp32_dot", "ieee")  # exact fp32 products on a GPU too
    q, k, v = _inputs((2, 2, 37, 16), seed=13)
    g = torch.Generator().manual_seed(12)
    dout = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, 2, 37, generator=g, dtype=torch.float64)
    exact = _run("reference", torch.float64, q, k, v, logit_scale, dout, dlse)
    own = _run("reference", torch.float32, q, k, v, logit_scale, dout, dlse)
    moved = [t.to(device) for t in (q, k, v, dout, dlse)]
    got = [t.cpu() for t in _run(backend, torch.float32, *moved[:3], logit_scale, *moved[3:])]
    assert all(torch.isfinite(t).all() for t in got + own)
    _assert_within_twice_the_reference(got, own, exact, 1e-7)


@pytest.mark.parametrize("backend", [b for b in ["reference"] + FUSED if b != "triton"])
def test_gradcheck_float64_all_outputs(backend):
    q, k, v = (t.requires_grad_() for t in _inputs((1, 2, 9, 4), dv=3, seed=5))

    def fn(q, k, v):
        out, lse = A.spatial_attention(q, k, v, logit_scale=0.8, backend=backend)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_gradcheck_compiled_ops_including_lse_attn():
    """The op's three outputs, lse_attn included (its gradient enters through delta)."""
    q, k, v = (t.requires_grad_() for t in _inputs((2, 1, 7, 4), dv=5, seed=6))
    assert torch.autograd.gradcheck(lambda q, k, v: OPS.spatial_attention_forward(q, k, v, 1.1), (q, k, v),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda q, k: OPS.spatial_attention_lse(q, k, -0.7), (q, k),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


GPU = [b for b in ("cuda", "triton", "aten")
       if torch.cuda.is_available() and b in runnable_backends("spatial_attention", "cuda", torch.float32)]
# the Triton interpreter has no bfloat16 (numpy lacks it)
LOW_PRECISION_CASES = [("cpu", b, d) for b in FUSED for d in (torch.float16, torch.bfloat16)
                       if not (b == "triton" and d == torch.bfloat16)]
LOW_PRECISION_CASES += [("cuda", b, d) for b in GPU for d in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend, case, fp32_dot", [(b, c, dot) for b in GPU for c in range(len(SHAPES))
                                                     for dot in ((None, "ieee") if b == "triton" else (None,))])
def test_gpu_matches_reference(backend, case, fp32_dot, monkeypatch, exact_fp32_matmul):
    """fp32 as torch's default leaves it (no TF32); Triton with its default tf32x3 dots and with
    exact ones ("ieee", its own tiles)."""
    monkeypatch.setattr(A.backends, "triton_fp32_dot", fp32_dot)
    shape, dv = SHAPES[case]
    q, k, v = (t.cuda() for t in _inputs(shape, dv, seed=case))
    dout = torch.randn(shape[:3] + (dv or shape[3],), dtype=torch.float64, device="cuda")
    dlse = torch.randn(shape[:3], dtype=torch.float64, device="cuda")
    want = _run("reference", torch.float64, q, k, v, 1.3, dout, dlse)
    got = _run(backend, torch.float32, q, k, v, 1.3, dout, dlse)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("device, backend, dtype", LOW_PRECISION_CASES)
@pytest.mark.parametrize("n", [45, 64])  # 64: tiles that divide the tokens (the kernels' unmasked path)
def test_low_precision_error_within_twice_the_reference(device, backend, dtype, n):
    q, k, v = (t.to(device) for t in _inputs((1, 2, n, 32), seed=7, scale=0.5))
    dout = torch.randn(1, 2, n, 32, dtype=torch.float64).to(device)
    dlse = torch.randn(1, 2, n, dtype=torch.float64).to(device)
    rq, rk, rv = (t.to(dtype).double() for t in (q, k, v))
    exact = _run("reference", torch.float64, rq, rk, rv, 1.0, dout, dlse)
    ref = _run("reference", dtype, rq, rk, rv, 1.0, dout, dlse)
    got = _run(backend, dtype, rq, rk, rv, 1.0, dout, dlse)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    _assert_within_twice_the_reference(got, ref, exact, 1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    q, k, v = _inputs((2, 1, 33, 16), seed=8)
    dout, dlse = torch.randn(2, 1, 33, 16, dtype=torch.float64), torch.randn(2, 1, 33, dtype=torch.float64)
    first = _run(backend, torch.float32, q, k, v, 1.0, dout, dlse)
    second = _run(backend, torch.float32, q, k, v, 1.0, dout, dlse)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_tied_q_k_give_the_same_gradients(backend):
    """tie_qk: the loss's window terms are added into by the attention backward, in place."""
    q, k, v = _inputs((2, 2, 30, 16), seed=9)
    probs = torch.softmax(torch.randn(2, 3, 10, 12, dtype=torch.float64), 1)
    hw, hb = torch.tensor([0.4, -0.3], dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    dout = torch.randn_like(q)
    dtype = _dtype_for(backend)
    grads = []
    for tie in (False, True):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        result = A.spatial_attention(*leaves, backend=backend, tie_qk=tie)
        out, lse = result[:2]
        qs, ks = result[2:] if tie else leaves[:2]
        loss = A.attentive_similarity_loss(qs, ks, probs.to(dtype), hw.to(dtype), hb.to(dtype), grid=(5, 6),
                                           radius=2, lse=lse, backend=loss_backend_for(backend))
        (3.0 * loss + (out * dout.to(dtype)).sum()).backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for untied, tied in zip(*grads):
        torch.testing.assert_close(tied, untied, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_tied_views_sharing_one_gradient_and_callers_grad_outputs(backend):
    """tie_qk when autograd hands q_view and k_view one gradient tensor ((q_view + k_view) feeds
    the loss), and when the caller passes its own grad_outputs: the attention's dq, dk go into
    buffers of the backward's own, so both gradients are right and the caller's tensors unchanged."""
    q, k, v = _inputs((2, 2, 30, 16), seed=10)
    dtype = _dtype_for(backend)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).to(dtype)
    want = None
    for be, dt in (("reference", torch.float64), (backend, dtype)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse, qv, kv = A.spatial_attention(*leaves, backend=be, tie_qk=True)
        ((out * dout.to(dt)).sum() + ((qv + kv) * 2.0).sum() + lse.sum()).backward()
        got = [t.grad.double() for t in leaves]
        if want is None:
            want = got
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, **tol, msg=name)

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse, qv, kv = A.spatial_attention(*leaves, backend=backend, tie_qk=True)
    g_out, g_lse = torch.ones_like(out), torch.ones_like(lse)
    g_q = torch.full_like(qv, 0.5)
    g_k = g_q  # one tensor for both views, as autograd may pass it
    before = g_q.clone()
    grads = torch.autograd.grad([out, lse, qv, kv], leaves, grad_outputs=[g_out, g_lse, g_q, g_k])
    assert torch.equal(g_q, before) and torch.equal(g_out, torch.ones_like(out))
    assert torch.equal(g_lse, torch.ones_like(lse))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r = A.spatial_attention(*ref_leaves, backend="reference", tie_qk=True)
    ref = torch.autograd.grad(list(r), ref_leaves, grad_outputs=[g_out.double(), g_lse.double(), before.double(),
                                                                before.double()])
    for name, g, w in zip("qkv", grads, ref):
        torch.testing.assert_close(g.double(), w, **tol, msg=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("heads, depth", [(1, 1), (2, 2)])
def test_block_and_loss_match_reference(backend, heads, depth):
    """SpatialSelfAttention + AttentiveSimilarityLoss end to end: every parameter's gradient."""
    dtype = _dtype_for(backend)
    grads = {}
    for be, dt in (("reference", torch.float64), (backend, dtype)):
        torch.manual_seed(0)
        block = SpatialSelfAttention(16, heads=heads, depth=depth, backend=be).to(dt)
        loss_fn = AttentiveSimilarityLoss(heads=block.similarity_heads, radius=2, backend=loss_backend_for(be)).to(dt)
        x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt)
        probs = torch.softmax(torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(2)), 1).to(dt)
        feats, sim = block(x)
        loss = loss_fn(sim, probs, torch.tensor([1.0, 0.5], dtype=dt)) + feats.square().mean()
        loss.backward()
        params = list(block.named_parameters()) + list(loss_fn.named_parameters())
        grads[be] = {name: p.grad.double() for name, p in params} | {"loss": loss.detach().double()}
    rtol, atol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-3, 1e-5)
    for name, want in grads["reference"].items():
        torch.testing.assert_close(grads[backend][name], want, rtol=rtol, atol=atol * max(want.abs().max(), 1e-3),
                                   msg=name)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_block_and_loss_never_save_an_n_by_n_tensor():
    n = 16 * 16
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    block = SpatialSelfAttention(16, heads=2, backend="cpu")
    loss_fn = AttentiveSimilarityLoss(heads=2, backend="cpu")
    x = torch.randn(2, 16, 16, 16)
    probs = torch.softmax(torch.randn(2, 4, 64, 64), 1).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats, sim = block(x)
        loss = loss_fn(sim, probs) + feats.mean()
    loss.backward()
    assert saved and max(saved) < n * n, f"a saved tensor has {max(saved)} elements (n^2 = {n * n})"
    assert block.blocks[0].q.weight.grad is not None and loss_fn.weight.grad is not None


@pytest.mark.parametrize("changes, error, match", [
    (dict(v=torch.rand(2, 2, 11, 8)), ValueError, "v must have shape"),
    (dict(v=torch.rand(2, 2, 10, 8, dtype=torch.float64)), TypeError, "v must have the dtype"),
    (dict(k=torch.rand(2, 2, 10, 4)), ValueError, "k must have the shape"),
    (dict(q=torch.rand(2, 10, 8)), ValueError, "q must have shape"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_inputs(changes, error, match):
    args = dict(q=torch.rand(2, 2, 10, 8), k=torch.rand(2, 2, 10, 8), v=torch.rand(2, 2, 10, 8))
    kwargs = {}
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=match):
        A.spatial_attention(*args.values(), **kwargs)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_compiled_ops_reject_bad_arguments():
    q = torch.rand(1, 1, 6, 4)
    with pytest.raises(ValueError, match="v must be"):
        OPS.spatial_attention_forward(q, q, torch.rand(1, 2, 6, 4), 1.0)
    with pytest.raises(TypeError, match="share one floating dtype"):
        OPS.spatial_attention_lse(q, q.double(), 1.0)
    with pytest.raises(ValueError, match="dlse must be"):
        OPS.spatial_attention_lse_backward(torch.rand(1, 1, 5), q, q, torch.rand(1, 1, 6), 1.0)
    with pytest.raises(ValueError, match="dout and out"):
        OPS.spatial_attention_backward(torch.rand(1, 1, 6, 3), None, None, q, q, q, q, torch.rand(1, 1, 6),
                                       torch.rand(1, 1, 6), 1.0)


def test_block_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        SpatialSelfAttention(10, heads=3)
    with pytest.raises(ValueError, match="x must be"):
        SpatialSelfAttention(8)(torch.rand(1, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_aten_gradient_carrier_is_laid_out_like_the_cuda_kernel_output(dtype):
    """torch's CUDA memory-efficient backward reads ``out`` with the row stride its forward's
    output has (heads * width): the "aten" backend's dLSE carrier must have that layout (checked
    on meta tensors, which follow the CUDA kernel's shapes and strides), and carry -dLSE."""
    from attenscribble_ops import aten_attention

    b, h, n, width = 2, 3, 50, 16
    q = torch.empty(b, h, n, width, device="meta", dtype=dtype)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0, False, scale=0.5)[0]
    dlse = torch.randn(b, h, n, dtype=torch.float64) * torch.logspace(-8, 0, n, dtype=torch.float64)
    carrier_dout, carrier_out, factor = aten_attention._lse_carrier(dlse, width, dtype)
    assert carrier_out.stride() == out.stride() and carrier_dout.stride() == out.stride()
    delta = (carrier_dout.double() * carrier_out.double()).sum(-1) / (1.0 if factor is None else float(factor))
    rel = 1e-6 if dtype == torch.float32 else (2.0 ** -21 if dtype == torch.float16 else 2.0 ** -15)
    # fp16: entries below 2**-28 of the largest fall to subnormals (quantum 2**-38 of the largest)
    atol = 2.0 ** -37 * dlse.abs().max().item() if dtype == torch.float16 else 0.0
    torch.testing.assert_close(delta, -dlse, rtol=rel, atol=atol)
