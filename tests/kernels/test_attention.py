"""The Triton flash-attention kernels (kernels/attention.py) against the reference in fp64: output and
every gradient, ragged lengths, every head_dim, sliding windows, decoding (Tq < Tk), strided q/k/v from
the fused qkv projection, determinism, dropout, the custom ops under opcheck and torch.compile, input
checks, and ahead-of-time compilation (tests/aot.py: every architecture it covers).

On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py), which computes
bf16 wrongly: bf16 numerics are only tested on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastgpt import kernels
from conftest import rand, DEVICE, KERNEL_DTYPES as DTYPES, check_against_fp64, check_kernel_error
from fastgpt.model import CausalSelfAttention, GPTConfig, KVCache
from fastgpt.kernels import attention
from fastgpt.kernels.attention import HEAD_DIMS, causal_attention_reference, causal_mask

CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.usefixtures("triton_kernels")


def qkv(b, h, tq, tk, d, dtype, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
                 for t in (tq, tk, tk))


def attention_check(name, actual, exact, torch_lowp):
    """The accuracy rule, except for results that are exactly 0: dq, dk of queries that see a single key
    are 0 (to fp64 rounding); the kernel gets P * (dP - delta), a cancellation of two O(1) fp32 sums (one a
    matmul, one a row sum): a few fp32 roundings."""
    if exact.abs().max() < 1e-12:
        assert actual.abs().max() <= 1e-5, f"{name}: {actual.abs().max()} where exactly 0"
    else:
        check_kernel_error(name, actual, exact, torch_lowp)


def assert_accurate(q, k, v, window=None, fn=None, reference=None):
    """out, dq, dk, dv of the Triton path (or `fn`) against the reference (or `reference`) in fp64, under
    the kernels' accuracy rule (tests/conftest.py)."""
    dout = torch.randn(q.shape, generator=torch.Generator(DEVICE).manual_seed(1), dtype=torch.float64)
    fn = fn or (lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, window))
    reference = reference or (lambda q, k, v: causal_attention_reference(q, k, v, 0.0, window))
    got = check_against_fp64(["out", "dq", "dk", "dv"], fn, reference, (q, k, v), (dout,), attention_check)
    assert all(g.dtype == q.dtype for g in got)


# ---------------------------------------------------------------------------------------------------
# numerics against the reference

# (T, head_dim, window): every T and every head_dim; windows cutting single tiles (1, 3), spanning a
# few (17, 50, 100) and one as long as T (the same as none)
CASES = [
    (1, 16, None), (7, 32, None), (7, 16, 3), (64, 64, None), (64, 32, 1), (65, 128, None), (65, 64, 17),
    (127, 16, None), (127, 64, 50), (256, 64, None), (256, 32, 256), (300, 32, None), (300, 64, 100),
    (300, 128, 17),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, d, window", CASES)
def test_matches_reference(t, d, window, dtype):
    assert_accurate(*qkv(1, 2 if t < 128 else 1, t, t, d, dtype), window)


# PTX's approximations, which a GPU runs for tl.math.exp2 and log2 on fp32 (the interpreter computes them
# exactly): ex2.approx.f32 has a relative error up to 2**-22.5, lg2.approx.f32 an absolute one up to 2**-22.6
APPROX_EXP2_RELATIVE, APPROX_LOG2_ABSOLUTE = 2.0**-22, 2.0**-22


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels run natively, with the GPU's own exp2 and log2")
@pytest.mark.parametrize("tq, tk, d, window", [(256, 256, 64, None), (300, 300, 128, 17), (127, 127, 16, None),
                                               (1, 300, 32, None)])
def test_fp32_accuracy_holds_with_the_gpus_approximate_exp2_and_log2(monkeypatch, tq, tk, d, window):
    """The fp32 floor was set where exp2 and log2 are exact. With errors a little larger than the GPU's
    approximations injected into every exp2 and log2 the kernels compute (random in sign and size, so they
    do not cancel in the softmax's normalisation), fp32 attention still meets the accuracy rule: the
    native fp32 tests need no wider floor for them."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not hasattr(builder, "create_exp2") or not hasattr(builder, "create_log2"):
        pytest.skip("this Triton's interpreter builds exp2 and log2 differently")
    rng = np.random.default_rng(0)
    calls = []

    def noisy(op, relative: bool):
        def create(self, arg):
            exact = op(arg.data)
            noise = rng.uniform(-1.0, 1.0, size=np.shape(exact))
            calls.append(op)
            value = exact * (1 + noise * APPROX_EXP2_RELATIVE) if relative else exact + noise * APPROX_LOG2_ABSOLUTE
            return interpreter.TensorHandle(np.asarray(value, dtype=exact.dtype), arg.dtype.scalar)
        return create

    monkeypatch.setattr(builder, "create_exp2", noisy(np.exp2, relative=True))
    monkeypatch.setattr(builder, "create_log2", noisy(np.log2, relative=False))
    assert_accurate(*qkv(1, 2, tq, tk, d, torch.float32), window)
    assert np.exp2 in calls and np.log2 in calls  # the kernels did compute through the noisy functions


# decoding and chunked prefill: the queries are the last Tq of Tk positions (causal mask bottom-right)
@pytest.mark.parametrize("tq, tk, d, window", [
    (1, 1, 64, None), (1, 65, 64, None), (1, 300, 32, None), (1, 300, 64, 100), (5, 127, 16, 7),
    (20, 300, 32, 17), (64, 127, 64, None), (100, 256, 128, 64),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_queries_than_keys(tq, tk, d, window, dtype):
    assert_accurate(*qkv(1, 2, tq, tk, d, dtype), window)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # from the later tiles, which do read them
def test_tiles_outside_the_band_are_never_read():
    """Tiles above the diagonal and left of the window are skipped, not masked: poisoning keys and values
    there with NaN (which a masked tile would turn into NaN * 0 = NaN) leaves the results untouched."""
    q, k, v = (t.detach() for t in qkv(1, 1, 200, 200, 32, torch.float32))
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 128:], poisoned_v[:, :, 128:] = float("nan"), float("nan")
    # causal: the first 128-query tile (forward and dQ) reads keys 0..127 only
    q_ = q.clone().requires_grad_()
    out = kernels.causal_attention(q_, poisoned_k, poisoned_v)
    dq, = torch.autograd.grad(out[:, :, :128].sum(), q_)
    q_ = q.clone().requires_grad_()
    clean = kernels.causal_attention(q_, k, v)
    clean_dq, = torch.autograd.grad(clean[:, :, :128].sum(), q_)
    assert torch.equal(out[:, :, :128], clean[:, :, :128]) and torch.equal(dq[:, :, :128], clean_dq[:, :, :128])
    # window: the last query with a window of 17 reads the 64-key tiles holding keys 183..199 only
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :128], poisoned_v[:, :, :128] = float("nan"), float("nan")
    assert torch.equal(kernels.causal_attention(q[:, :, -1:], poisoned_k, poisoned_v, window=17),
                       kernels.causal_attention(q[:, :, -1:], k, v, window=17))


def test_lse_is_the_log_sum_exp_of_the_masked_scores():
    q, k, v = (t.detach() for t in qkv(1, 2, 70, 130, 32, torch.float32))
    _, lse = attention._causal_attention_fwd(q, k, v, None, 0.0, 40)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(32)
    scores = scores.masked_fill(~causal_mask(70, 130, 40, q.device), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-6)


def test_fused_qkv_views_are_read_in_place(monkeypatch):
    """q, k, v as the model makes them: views of one (B, T, 3C) projection, strided, never copied."""
    b, t, h, d = 2, 70, 2, 32
    x = torch.randn(b, t, 3 * h * d, dtype=torch.float32, device=DEVICE, requires_grad=True)
    q, k, v = (y.view(b, t, h, d).transpose(1, 2) for y in x.split(h * d, dim=2))  # (B, H, T, D)
    assert not q.is_contiguous() and q.stride(-1) == 1

    seen = []
    original = attention._unit_stride
    monkeypatch.setattr(attention, "_unit_stride", lambda t: seen.append(t.data_ptr()) or original(t))
    out = kernels.causal_attention(q, k, v, 0.0, 20)
    monkeypatch.undo()
    assert seen == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    (out * out).sum().backward()
    got = (out, *x.grad.split(h * d, dim=2))
    want = causal_attention_reference(q.double(), k.double(), v.double(), 0.0, 20)
    x.grad = None
    (want * want).sum().backward()
    want = (want, *x.grad.split(h * d, dim=2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)
    # and the same bits as on contiguous copies: the strides are honoured, not approximated
    copies = kernels.causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, 20)
    assert torch.equal(out, copies)
    # the output is laid out (B, T, H, D): the model's transpose back to (B, T, C) needs no copy
    assert out.transpose(1, 2).is_contiguous()


def test_head_dim_without_unit_stride_is_copied():
    q, k, v = (t.detach().transpose(-2, -1).contiguous().transpose(-2, -1) for t in qkv(1, 2, 33, 33, 16,
                                                                                          torch.float32))
    assert q.stride(-1) != 1
    torch.testing.assert_close(kernels.causal_attention(q, k, v),
                               causal_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_deterministic():
    """No atomics: two runs give the same bits, forward and backward."""
    q, k, v = qkv(1, 2, 130, 130, 32, torch.float16)

    def run():
        out = kernels.causal_attention(q, k, v, 0.0, 50)
        return (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_model_attention_layer_and_kv_cache():
    """CausalSelfAttention on the Triton kernel: the full pass matches the reference's, and decoding
    one position at a time through the KV cache reproduces it."""
    config = GPTConfig(block_size=40, n_layer=1, n_head=2, n_embd=64, dropout=0.0, attn_window=9)
    torch.manual_seed(0)
    layer = CausalSelfAttention(config).to(DEVICE)
    x = torch.randn(2, 40, 64, device=DEVICE)
    full = layer(x)
    with kernels.backend("reference"):
        torch.testing.assert_close(full, layer(x), atol=1e-5, rtol=1e-5)
    cache = KVCache(config.block_size)
    steps = [layer(x[:, :30], cache, 0)] + [layer(x[:, p:p + 1], cache, p) for p in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# dropout


def explicit_dropout_attention(q, k, v, keep, p, window):
    """softmax(masked S) * keep / (1 - p) @ v, spelled out in fp64: SDPA's dropout with a given mask."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~causal_mask(q.size(-2), k.size(-2), window, q.device), float("-inf"))
    return (torch.softmax(scores, dim=-1) * keep / (1 - p)) @ v


@pytest.mark.parametrize("tq, tk, d, window", [(65, 65, 32, None), (130, 130, 16, 40), (20, 150, 64, None)])
def test_dropout_applies_the_mask_it_reports_forward_and_backward(tq, tk, d, window):
    p = 0.3
    q, k, v = qkv(2, 2, tq, tk, d, torch.float32)
    seed = torch.tensor([1234567], dtype=torch.int64, device=DEVICE)
    keep = attention._dropout_keep_mask(seed, 2, 2, tq, tk, p)
    assert keep.shape == (2, 2, tq, tk)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])  # per head
    # the backward regenerates the mask from the seed: all four agree with the mask only if it does
    assert_accurate(q, k, v, fn=lambda q, k, v: attention._causal_attention_fwd(q, k, v, seed, p, window)[0],
                    reference=lambda q, k, v: explicit_dropout_attention(q, k, v, keep.to(q.dtype), p, window))


def test_dropout_keep_rate_and_seeds():
    p = 0.2
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    keep = attention._dropout_keep_mask(seed, 1, 2, 256, 256, p).float()
    # 131072 Bernoulli(0.8) draws: the rate's standard error is 1.1e-3, so 6e-3 is > 5 sigma
    assert abs(keep.mean().item() - (1 - p)) < 6e-3
    for h in (0, 1):  # each head on its own, and no pattern between halves of the rows or columns
        assert abs(keep[0, h].mean().item() - (1 - p)) < 8e-3
        assert abs(keep[0, h, :, :128].mean().item() - keep[0, h, :, 128:].mean().item()) < 1.2e-2
        assert abs(keep[0, h, :128].mean().item() - keep[0, h, 128:].mean().item()) < 1.2e-2
    assert abs((keep[0, 0] == keep[0, 1]).float().mean().item() - (0.8**2 + 0.2**2)) < 1.2e-2  # independent
    assert torch.equal(attention._dropout_keep_mask(seed, 1, 2, 256, 256, p).float(), keep)
    other = attention._dropout_keep_mask(seed + 1, 1, 2, 256, 256, p).float()
    assert abs((keep == other).float().mean().item() - (0.8**2 + 0.2**2)) < 8e-3


def test_dropout_is_unbiased():
    """Uniform attention (q = 0) over values of 1: every row's output has expectation exactly 1."""
    b, h, t, d, p = 1, 2, 256, 16, 0.3
    q = torch.zeros(b, h, t, d, device=DEVICE)
    v = torch.ones(b, h, t, d, device=DEVICE)
    torch.manual_seed(0)
    out = kernels.causal_attention(q, q, v, dropout_p=p)
    # row i averages i+1 kept-or-not draws scaled by 1/(1-p): variance p/((1-p)(i+1)); the mean over
    # rows and heads has a standard deviation of ~0.005 (a missing rescale gives 0.7, a normaliser over
    # the kept probabilities only gives 1/(1-p) = 1.43)
    assert abs(out[..., 0].mean().item() - 1.0) < 0.03
    assert (out[..., 0] == 0).any() and (out[..., 0] > 1).any()


def test_dropout_follows_torch_manual_seed():
    q, k, v = (t.detach() for t in qkv(1, 2, 40, 40, 16, torch.float32))
    torch.manual_seed(5)
    a = kernels.causal_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    b = kernels.causal_attention(q, k, v, dropout_p=0.5)
    c = kernels.causal_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------
# the custom ops


def test_opcheck():
    q, k, v = qkv(1, 2, 20, 33, 16, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    for args in ((q, k, v, None, 0.0, None), (q, k, v, seed, 0.25, 9)):
        torch.library.opcheck(attention._causal_attention_fwd, args)
    out, lse = attention._causal_attention_fwd(q, k, v, seed, 0.25, 9)
    torch.library.opcheck(attention._causal_attention_bwd,
                          (torch.randn_like(out), *(t.detach() for t in (q, k, v, out, lse)), seed, 0.25, 9))


def test_torch_compile_fullgraph():
    """The ops trace with no graph break (dropout's seed draw included) and compute what eager does."""
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 24, 24, 16, torch.float32)

    def f(q, k, v, dropout_p):
        return kernels.causal_attention(q, k, v, dropout_p, 10).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # Inductor: tests/test_model.py
    for dropout_p in (0.0, 0.2):
        torch.manual_seed(0)
        loss = compiled(q, k, v, dropout_p)
        grads = torch.autograd.grad(loss, (q, k, v))
        torch.manual_seed(0)
        want = f(q, k, v, dropout_p)
        want_grads = torch.autograd.grad(want, (q, k, v))
        assert torch.equal(loss, want)
        for g, w in zip(grads, want_grads):
            assert torch.equal(g, w)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("dtypes, message", [
    ((torch.float64,) * 3, r"takes float32, float16 or bfloat16, got q in torch.float64"),
    ((torch.float32, torch.float32, torch.int32), r"takes float32, float16 or bfloat16, got v in torch.int32"),
    ((torch.float32, torch.float16, torch.float16), r"takes one dtype, got k in torch.float16 and q in torch.float32"),
])
def test_rejects_dtypes(dtypes, message):
    q, k, v = (torch.zeros(1, 1, 4, 16, dtype=dt, device=DEVICE) for dt in dtypes)
    with pytest.raises(ValueError, match=f"causal_attention: .*{message}"):
        kernels.causal_attention(q, k, v)


@pytest.mark.parametrize("d", [8, 24, 96, 256])
def test_rejects_head_dims(d):
    q = torch.zeros(1, 1, 4, d, device=DEVICE)
    with pytest.raises(ValueError, match=rf"supports head_dim in 16, 32, 64, 128, got {d}"):
        kernels.causal_attention(q, q, q)


def test_rejects_mixed_devices_and_oversized_dropout():
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal_attention: v is on meta but q is on"):
        kernels.causal_attention(q, q, q.to("meta"))
    big = torch.empty(1, 1, 50000, 16, device="meta")
    assert attention._problem(big, big, big, 0.1).endswith("dropout in the Triton kernel needs Tq * Tk < 2**31, "
                                                          "got 50000 x 50000")
    assert attention._problem(big, big, big, 0.0) is None


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation for the GPUs


def test_each_gpu_generation_gets_tiles_that_compile_clean_there():
    """Before sm_80 (a T4: 64 KiB of shared memory) the sm_80/sm_90 tiles spill kilobytes of registers and
    overflow shared memory: 16-bit inputs take small 2-stage tiles there; on sm_100 the dK/dV pipeline is
    2 stages. tests/aot.py compiles what the launcher picks on each architecture (test_aot)."""
    for d in HEAD_DIMS:
        for decode in (False, True):
            hopper = attention._tiles(d, torch.bfloat16, decode, 90)
            assert attention._tiles(d, torch.bfloat16, decode, 80) == attention._tiles(d, torch.bfloat16, decode, 86)
            turing = attention._tiles(d, torch.float16, decode, 75)
            assert all(m * n <= 64 * 32 and stages == 2 for name, (m, n, _, stages) in turing.items()
                       if name != "preprocess")
            blackwell = attention._tiles(d, torch.bfloat16, decode, 100)
            assert blackwell["dkdv"] == (*hopper["dkdv"][:3], 2) and blackwell["fwd"] == hopper["fwd"]
    assert attention._tiles(64, torch.float32, False, 75) == attention._tiles(64, torch.float32, False, 90)


def test_auto_backend_falls_back_to_the_reference_outside_the_kernel_limits(monkeypatch):
    """Under "auto" a CUDA model with an unsupported head_dim (384 / 8 heads = 48) runs the reference
    instead of failing; "triton" asked for explicitly still refuses with the launcher's message."""
    problems = []
    monkeypatch.setattr(attention, "select",
                        lambda op, x, ref, tri, problem=None: problems.append(problem) or ref)
    q = torch.zeros(1, 1, 4, 48, device=DEVICE)
    attention.causal_attention(q, q, q)
    q = torch.zeros(1, 1, 4, 64, device=DEVICE)
    attention.causal_attention(q, q, q)
    attention.causal_attention(q.double(), q.double(), q.double())
    wide = torch.zeros(1, 1, 4, 64, device=DEVICE).expand(attention.MAX_BATCH_HEADS + 1, 1, 4, 64)
    attention.causal_attention(wide, wide, wide)  # more (batch, head) pairs than a grid axis holds
    assert [p is None for p in problems] == [False, True, False, False]
    assert "head_dim in 16, 32, 64, 128, got 48" in problems[0] and "batch * heads <= 65535" in problems[3]


# ---------------------------------------------------------------------------------------------------
# the public entry point (backend auto) against explicit fp64 maths written here


def explicit_attention(q, k, v, window):
    """softmax over the masked score matrix, the mask spelled out entry by entry."""
    tq, tk, d = q.size(-2), k.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, Tq, Tk)
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        position = i + tk - tq  # the queries are the last tq positions of the key sequence
        for j in range(tk):
            allowed[i, j] = j <= position and (window is None or j >= position - window + 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.api
@pytest.mark.parametrize("tq, tk", [(1, 1), (7, 7), (65, 65), (1, 7), (3, 7), (1, 65), (20, 65)])
@pytest.mark.parametrize("window", [None, 1, 3, 64])
def test_causal_attention_matches_masked_softmax(tq, tk, window):
    q, k, v = rand(2, 3, tq, 5, seed=1), rand(2, 3, tk, 5, seed=2), rand(2, 3, tk, 5, seed=3)
    out = kernels.causal_attention(q, k, v, window=window)
    assert out.shape == (2, 3, tq, 5)
    torch.testing.assert_close(out, explicit_attention(q, k, v, window))


@pytest.mark.api
def test_causal_attention_decode_step_is_the_last_row_of_the_full_attention():
    """What KV-cached decoding relies on: one query over all keys is the full result's last row."""
    q, k, v = rand(1, 2, 9, 4, seed=1), rand(1, 2, 9, 4, seed=2), rand(1, 2, 9, 4, seed=3)
    for window in (None, 4):
        full = kernels.causal_attention(q, k, v, window=window)
        torch.testing.assert_close(kernels.causal_attention(q[:, :, -1:], k, v, window=window), full[:, :, -1:])
        torch.testing.assert_close(kernels.causal_attention(q[:, :, -3:], k, v, window=window), full[:, :, -3:])


@pytest.mark.api
@pytest.mark.parametrize("tq, tk", [(7, 7), (2, 7), (65, 65)])
def test_causal_attention_window_at_least_t_is_full_causal(tq, tk):
    q, k, v = rand(1, 2, tq, 4, seed=1), rand(1, 2, tk, 4, seed=2), rand(1, 2, tk, 4, seed=3)
    full = kernels.causal_attention(q, k, v, window=None)
    for window in (tk, tk + 1, 10 * tk):
        torch.testing.assert_close(kernels.causal_attention(q, k, v, window=window), full)
    # and a window just short of it does change something, so the comparison above can fail
    assert not torch.allclose(kernels.causal_attention(q, k, v, window=tk - 1), full)


@pytest.mark.api
@pytest.mark.parametrize("tq, tk, window", [(4, 4, None), (4, 4, 2), (2, 5, None), (2, 5, 2), (1, 3, 1)])
def test_causal_attention_gradients(tq, tk, window):
    q = rand(1, 2, tq, 3, seed=1).requires_grad_()
    k = rand(1, 2, tk, 3, seed=2).requires_grad_()
    v = rand(1, 2, tk, 3, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, window), (q, k, v))


@pytest.mark.api
def test_causal_attention_dropout_is_random_and_unbiased():
    n, t, d, p = 4000, 6, 4, 0.5
    # one (q, k, v) repeated n times along the batch: every copy draws its own dropout mask
    q, k = rand(1, 1, t, d, seed=1).expand(n, 1, t, d), rand(1, 1, t, d, seed=2).expand(n, 1, t, d)
    v = (3.0 + rand(1, 1, t, d, seed=3)).expand(n, 1, t, d)  # far from 0, so a missing 1/(1-p) shows
    exact = kernels.causal_attention(q[:1], k[:1], v[:1])
    torch.manual_seed(0)
    dropped = kernels.causal_attention(q, k, v, dropout_p=p)
    torch.manual_seed(0)
    assert torch.equal(kernels.causal_attention(q, k, v, dropout_p=p), dropped)  # seeded: reproducible
    # row 0 attends only to itself: its output is v[0] / (1 - p) or 0 in every copy
    assert ((dropped[:, 0] - exact[:, 0]).abs() > 1e-6).float().mean() > 0.9
    assert 0.4 < (dropped[:, 0, 0] == 0).all(dim=-1).float().mean() < 0.6
    # unbiased: the mean over copies is the dropout-free output; a copy's std is at most
    # |v| sqrt(p / (1 - p)) ~ 4.5, so the mean's is ~0.07 and 0.4 is > 5 sigma, while a missing
    # rescale would be off by ~1.5 (half of v)
    assert (dropped.mean(dim=0) - exact[0]).abs().max() < 0.4


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((2, 4, 3), (2, 4, 3), (2, 4, 3)),  # not 4-D
    ((1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 5, 3)),  # k, v differ
    ((1, 2, 5, 3), (1, 2, 4, 3), (1, 2, 4, 3)),  # Tq > Tk
    ((1, 2, 4, 3), (1, 2, 4, 5), (1, 2, 4, 5)),  # head dims differ
    ((1, 2, 4, 3), (1, 3, 4, 3), (1, 3, 4, 3)),  # head counts differ
    ((2, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 3)),  # batch sizes differ
])
@pytest.mark.api
def test_causal_attention_rejects_bad_shapes(q_shape, k_shape, v_shape):
    with pytest.raises(ValueError, match=r"causal_attention: expected q \(B, H, Tq, D\).*got q "
                                         + r"\(" + ", ".join(map(str, q_shape))):
        kernels.causal_attention(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(v_shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"dropout_p": 1.0}, "dropout_p must be in"), ({"dropout_p": -0.1}, "dropout_p must be in"),
    ({"window": 0}, "window must be None or >= 1"), ({"window": -3}, "window must be None or >= 1"),
])
@pytest.mark.api
def test_causal_attention_rejects_bad_arguments(kwargs, message):
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match=f"causal_attention: {message}"):
        kernels.causal_attention(q, q, q, **kwargs)
