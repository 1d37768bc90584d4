"""GPU tests: the fused ops on a real GPU, large and odd shapes, fp32 precision classes and
half dtypes, against eager and an fp64 reference. Skipped on machines without a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fusion_backend
from fusion_backend.models import MLPBlock, RNNCell, UnrolledRNN, fp64_reference
from conftest import randomize_batch_norm
from tolerances import allowed_error, grad_close, rel_err, stats_close

NO_TUNE = {"autotune": False}

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


CASES = [  # (M, K, N, dtype, precision)
    (37, 100, 75, torch.float32, "highest"),
    (1000, 1000, 999, torch.float32, "highest"),
    (1000, 1000, 999, torch.float32, "high"),
    (4096, 2048, 2048, torch.float32, "high"),
    (1000, 1000, 999, torch.float16, "highest"),
    (1000, 1000, 999, torch.bfloat16, "highest"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("M,K,N,dtype,precision", CASES)
def test_linear_bn_gelu_relu_gpu(M, K, N, dtype, precision, train):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(M + N)
    m = randomize_batch_norm(MLPBlock(K, N)).cuda().to(dtype).train(train)
    eager = MLPBlock(K, N).cuda().to(dtype).train(train)
    eager.load_state_dict(m.state_dict())
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ref = fp64_reference(m, x)
    rm0, rv0 = m.batch_norm.running_mean.double().clone(), m.batch_norm.running_var.double().clone()
    # the kernels themselves (heuristic config): with tuning on, a site may rightly go unfused
    compiled = torch.compile(m, backend="fusedtriton", options=NO_TUNE)
    with torch.no_grad():
        out = compiled(x)
        e = eager(x)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    err, eager_err = rel_err(out, ref), rel_err(e, ref)
    assert err <= allowed_error(dtype, precision, eager_err), (err, eager_err)
    if train:
        # running statistics against their fp64 update (at TF32 the GEMM output itself differs
        # from eager's by TF32 rounding, so ours and eager's are each compared with fp64)
        y64 = F.linear(x.double(), m.gemm.weight.double(), m.gemm.bias.double())
        mom = m.batch_norm.momentum
        for name, start, stat64 in (("running_mean", rm0, y64.mean(0)),
                                    ("running_var", rv0, y64.var(0, unbiased=True))):
            want = (1 - mom) * start + mom * stat64
            eager_err = rel_err(getattr(eager.batch_norm, name), want)
            assert rel_err(getattr(m.batch_norm, name), want) <= allowed_error(dtype, precision, eager_err), name
        assert m.batch_norm.num_batches_tracked.item() == eager.batch_norm.num_batches_tracked.item() == 1


def test_linear_bn_gelu_relu_gpu_noncontiguous_nan_grad():
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(1)
    m = MLPBlock(300, 257, approximate="tanh").cuda().train()
    eager = MLPBlock(300, 257, approximate="tanh").cuda().train()
    eager.load_state_dict(m.state_dict())
    base = torch.randn(600, 301, device="cuda")
    x = base[::2, 1:].requires_grad_(False).clone()[:, :].t().contiguous().t()  # column-major view
    assert not x.is_contiguous()
    xr = x.detach().clone().requires_grad_(True)
    xe = x.detach().clone().requires_grad_(True)
    ref = fp64_reference(eager, x)
    out = torch.compile(m, backend="fusedtriton", options=NO_TUNE)(xr)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    out.square().sum().backward()
    e = eager(xe)
    e.square().sum().backward()
    assert rel_err(out, ref) <= allowed_error(torch.float32, "highest", rel_err(e, ref))
    assert rel_err(out, e) <= allowed_error(torch.float32, "highest", rel_err(e, ref))
    torch.testing.assert_close(xr.grad, xe.grad, **grad_close(xe.grad))
    dy_scale = (2 * e.detach()).abs().max().item()  # d(sum y^2)/dy
    for (n, p), (_, q) in zip(m.named_parameters(), eager.named_parameters()):
        # the Linear bias's exact gradient is 0 in front of a training-mode BatchNorm
        scale = dy_scale if n == "gemm.bias" else None
        torch.testing.assert_close(p.grad, q.grad, **grad_close(q.grad, scale), msg=lambda msg: f"{n}: {msg}")
    # NaN in -> NaN at the same positions as eager (eval: rows stay independent)
    m.eval(), eager.eval()
    torch._dynamo.reset()
    xn = torch.randn(65, 300, device="cuda") * 1e4
    xn[3, 7] = float("nan")
    xn[10, 2] = float("inf")
    with torch.no_grad():
        out, e = torch.compile(m, backend="fusedtriton", options=NO_TUNE)(xn), eager(xn)
        ref = fp64_reference(eager, xn)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 2
    assert torch.equal(out.isnan(), e.isnan())
    assert torch.equal(out.isinf(), e.isinf())  # GELU(+inf) = inf, as in eager
    finite = torch.isfinite(e)
    eager_err = rel_err(e[finite], ref[finite])
    assert rel_err(out[finite], ref[finite]) <= allowed_error(torch.float32, "highest", eager_err)


@pytest.mark.parametrize("B,I,H,O,dtype,precision", [
    (8, 1024, 256, 128, torch.float32, "highest"),
    (256, 4096, 4096, 2048, torch.float32, "highest"),
    (256, 4096, 4096, 2048, torch.float32, "high"),
    (100, 1000, 999, 77, torch.bfloat16, "highest"),
    (100, 1000, 999, 77, torch.float16, "highest"),
])
def test_cat_linear_tanh_gpu(B, I, H, O, dtype, precision):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(B)
    m = RNNCell(I, H, O).cuda().to(dtype)
    x = torch.randn(B, I, device="cuda", dtype=dtype) * 3
    h = torch.randn(B, H, device="cuda", dtype=dtype)
    sd = {k: v.double() for k, v in m.state_dict().items()}
    ref_h = torch.tanh(F.linear(torch.cat((x.double(), h.double()), 1), sd["i2h.weight"], sd["i2h.bias"]))
    with torch.no_grad():
        out, new_h = torch.compile(m, backend="fusedtriton", options=NO_TUNE)(x, h)
        _, eager_h = m(x, h)
    assert fusion_backend.counters["cat_linear_tanh"] == 1
    # h2o runs in the cell's kernels at 3xTF32 and where the profile has the W x^T tiles
    # (TF32/fp16/bf16); untuned here, so the fusing is not left to a timing
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import devices

    profile = devices.device_profile(torch.device("cuda"))
    dot = profile.dot_precision(dtype, precision)
    has_kernel = dot == "tf32x3" or any(c.get("WXT") for c in clt.cell_space(profile, dtype, dot))
    assert fusion_backend.counters["cell_h2o"] == has_kernel
    err, eager_err = rel_err(new_h, ref_h), rel_err(eager_h, ref_h)
    assert err <= allowed_error(dtype, precision, eager_err), (err, eager_err)
    ref_out = F.linear(ref_h, sd["h2o.weight"], sd["h2o.bias"])
    err, eager_err = rel_err(out, ref_out), rel_err(m.h2o(eager_h), ref_out)
    assert err <= allowed_error(dtype, precision, eager_err), ("h2o", err, eager_err)


def test_cat_linear_tanh_gpu_no_overflow():
    """Inputs up to ~4e3 (rows 8+) saturate tanh: exactly +-1 where eager's is, never NaN;
    rows 0-7 stay in tanh's curved range and match fp64 at the precision class."""
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(9)
    m = RNNCell(64, 32, 8).cuda()
    x = torch.randn(16, 64, device="cuda") * 1e3
    x[:8] *= 1e-3
    h = torch.randn(16, 32, device="cuda")
    with torch.no_grad():
        _, new_h = torch.compile(m, backend="fusedtriton", options=NO_TUNE)(x, h)
        _, eager_h = m(x, h)
        ref_h = torch.tanh(F.linear(torch.cat((x.double(), h.double()), 1), m.i2h.weight.double(),
                                    m.i2h.bias.double()))
    assert fusion_backend.counters["cat_linear_tanh"] == 1
    assert torch.isfinite(new_h).all()
    saturated = eager_h.abs() == 1
    assert saturated[8:].float().mean() > 0.5 and not saturated[:8].all()
    assert torch.equal(new_h[saturated], eager_h[saturated])
    assert rel_err(new_h[:8], ref_h[:8]) <= allowed_error(torch.float32, "highest", rel_err(eager_h[:8], ref_h[:8]))


def test_reduce_overhead_captures_fused_ops(monkeypatch):
    """mode="reduce-overhead": the fused ops are captured in CUDA graphs with the rest
    (no host sync or allocation in the launchers breaks the capture)."""
    from torch._dynamo.utils import counters as dynamo_counters

    torch.manual_seed(3)
    m = randomize_batch_norm(MLPBlock(256, 192)).cuda().eval()
    cell = RNNCell(64, 96, 32).cuda()
    x = torch.randn(64, 256, device="cuda")
    xr, hr = torch.randn(16, 64, device="cuda"), torch.randn(16, 96, device="cuda")
    dynamo_counters["inductor"].clear()
    replays = []
    original_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original_replay(self))[1])
    with torch.no_grad():
        # tuning off: at these tiny shapes the tuner may rightly leave a site to Inductor
        opts = {"mode": "reduce-overhead", "autotune": False}
        fm = torch.compile(m, backend="fusedtriton", options=opts)
        fc = torch.compile(cell, backend="fusedtriton", options=opts)
        for _ in range(4):  # warm-up runs, then recorded graphs are replayed
            out_m, (out_c, h_c) = fm(x).clone(), [t.clone() for t in fc(xr, hr)]
        ref_m, (ref_c, ref_h) = m(x), cell(xr, hr)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1 and fusion_backend.counters["cat_linear_tanh"] == 1
    assert dynamo_counters["inductor"]["cudagraph_skips"] == 0, dict(dynamo_counters["inductor"])
    assert len(replays) >= 2  # graphs were recorded and replayed
    precision = torch.get_float32_matmul_precision()
    with torch.no_grad():
        ref64_c, ref64_h = copy.deepcopy(cell).double()(xr.double(), hr.double())
    for got, eager_out, ref64 in ((out_m, ref_m, fp64_reference(m, x)), (h_c, ref_h, ref64_h), (out_c, ref_c, ref64_c)):
        assert rel_err(got, ref64) <= allowed_error(torch.float32, precision, rel_err(eager_out, ref64))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_tuned_site_fused_or_left_to_inductor(train):
    """With tuning on, each site is timed at compile time; it is fused only when the fused
    kernel beats the unfused path, and explain() shows the choice with both times."""
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(5)
    m = MLPBlock(2048, 2048).cuda().train(train)
    eager = MLPBlock(2048, 2048).cuda().train(train)
    eager.load_state_dict(m.state_dict())
    x = torch.randn(4096, 2048, device="cuda")
    with torch.no_grad():
        report = fusion_backend.explain(m, x)
        out, ref = torch.compile(m, backend="fusedtriton")(x), eager(x)
    sites = report.fused + report.skipped
    assert len(sites) == 1, report
    site = sites[0]
    if site.fused:
        assert "ms" in site.info["choice"] and "unfused" in site.info["choice"], report
    else:
        # unfused faster by GPU time, or launch-bound once host time per call is counted
        assert "left to Inductor" in site.reason and "ms" in site.reason, report
    ref64 = fp64_reference(eager, x)
    assert rel_err(out, ref64) <= allowed_error(torch.float32, "high", rel_err(ref, ref64))


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_rnn_sequence_gpu_seed_sizes(precision):
    """The issue's sequence: 256 steps, batch 8, input 1024, hidden 256, output 128."""
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(6)
    m = UnrolledRNN(1024, 256, 128).cuda()
    xs, h0 = torch.randn(256, 8, 1024, device="cuda"), torch.randn(8, 256, device="cuda")
    with torch.no_grad():
        opts = dict(NO_TUNE, patterns=["cat_linear_tanh", "rnn_sequence"])  # named: both on by default too
        out, h = torch.compile(m, backend="fusedtriton", options=opts)(xs, h0)
        e_out, e_h = m(xs, h0)
        r_out, r_h = m.double()(xs.double(), h0.double())
    assert fusion_backend.counters["rnn_sequence"] == 1
    assert rel_err(out, r_out) <= allowed_error(torch.float32, precision, rel_err(e_out, r_out))
    assert rel_err(h, r_h) <= allowed_error(torch.float32, precision, rel_err(e_h, r_h))


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "highest"), (torch.float32, "high"),
                                             (torch.bfloat16, "highest")])
@pytest.mark.parametrize("B,H", [(5, 300), (8, 256), (1, 17)])
def test_recurrence_kernel_gpu_multi_program(B, H, dtype, precision):
    """The recurrence with its hidden columns split over programs that meet at a grid barrier
    after each step (a missing or broken barrier shows as a wrong, run-to-run varying result)."""
    import fusion_backend.patterns.rnn_sequence as seq
    from fusion_backend import config_spaces, devices

    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(H)
    T = 64
    p = (torch.randn(T, B, H, device="cuda") * 2).to(dtype)
    h0 = torch.randn(B, H, device="cuda").to(dtype)
    w_h = (torch.randn(H, H, device="cuda") / H ** 0.5).to(dtype)
    profile = devices.device_profile(p.device)
    config = config_spaces.space_for(profile, config_spaces.RECURRENCE)[0]
    assert config["GRID_SYNC"]
    ref = torch.empty(T + 1, B, H, device="cuda", dtype=torch.float64)
    ref[0] = h0.double()
    ref = seq._reference(p.double(), w_h.double(), ref)
    eager = torch.empty(T + 1, B, H, device="cuda", dtype=dtype)
    eager[0] = h0
    eager = seq._reference(p, w_h, eager)
    for _ in range(3):  # a fresh output each run: every row written, right every time
        hs = seq.recurrence(p, h0, w_h, profile.dot_precision(dtype))
        assert not seq._failed, seq._failed  # the kernel ran (no fallback to torch ops)
        assert torch.isfinite(hs).all()
        assert rel_err(hs, ref) <= allowed_error(dtype, precision, rel_err(eager, ref))


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32x3"), (torch.float32, "tf32"),
                                             (torch.bfloat16, "ieee")])
@pytest.mark.parametrize("M,K,N", [(1000, 1000, 999), (37, 100, 75), (4096, 2048, 2048)])
def test_tma_eval_kernel_gpu(M, K, N, dtype, precision):
    """Each TMA config of the profile's GEMM space against the fp64 reference, within the
    error of the same precision class (bf16 with K = 100 has 200-byte rows: not TMA-ready,
    the pointer kernel runs with the same tiles)."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import config_spaces, devices
    from fusion_backend.patterns._common import kernel_kwargs

    torch.manual_seed(M + K)
    profile = devices.device_profile(torch.device("cuda"))
    configs = [c for c in config_spaces.for_dtype(config_spaces.space_for(profile, config_spaces.GEMM), dtype)
               if c.get("TMA") and not c.get("WXT")]  # the cell's W x^T kernels: tested below
    if not configs:
        pytest.skip(f"no TMA configs for {dtype} on profile {profile.name} ({profile.arch})")
    x = (torch.randn(M, K, device="cuda") * 2).to(dtype)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b, gamma, beta, mean = (torch.randn(N, device="cuda").to(dtype) for _ in range(4))
    var = (torch.rand(N, device="cuda") + 0.5).to(dtype)
    ref = lbgr._reference(*(t.double() for t in (x, w, b, gamma, beta, mean, var)), 1e-5, "none")
    eager = lbgr._reference(x, w, b, gamma, beta, mean, var, 1e-5, "none")
    setting = "highest" if precision == "tf32x3" else "high"
    for config in configs:
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", precision, out)(kernel_kwargs(config, profile))
        assert rel_err(out, ref) <= allowed_error(dtype, setting, rel_err(eager, ref)), config


def _presplit_configs(space_fn):
    from fusion_backend import devices

    profile = devices.device_profile(torch.device("cuda"))
    configs = [c for c in space_fn(profile) if c.get("PRESPLIT")]
    if not configs:
        pytest.skip(f"no pre-split 3xTF32 configs on profile {profile.name} ({profile.arch})")
    return profile, configs


@pytest.mark.parametrize("apply_tanh", [True, False], ids=["cell", "h2o"])
@pytest.mark.parametrize("M,widths,N", [(256, (4096, 4096), 4096), (37, (100, 76), 75), (1, (64, 36), 33)])
def test_presplit_cell_kernel_gpu(M, widths, N, apply_tanh):
    """Each pre-split 3xTF32 config of the cell kernel (out^T = W x^T, the cat operands split
    once per call) against fp64, within fp32 "highest"'s class."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend.patterns._common import kernel_kwargs

    profile, configs = _presplit_configs(lambda p: clt.cell_space(p, torch.float32, "tf32x3"))
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(M + N)
    xs = [torch.randn(M, w, device="cuda") * 2 for w in widths]
    K = sum(widths)
    w = torch.randn(N, K, device="cuda") / K ** 0.5
    b = torch.randn(N, device="cuda")
    y64 = F.linear(torch.cat(xs, 1).double(), w.double(), b.double())
    y32 = F.linear(torch.cat(xs, 1), w, b)
    ref, eager = (torch.tanh(y64), torch.tanh(y32)) if apply_tanh else (y64, y32)
    for config in configs:
        out = torch.full((M, N), float("nan"), device="cuda")
        clt.runner(xs, w, b, "tf32x3", out, apply_tanh)(kernel_kwargs(config, profile))
        assert rel_err(out, ref) <= allowed_error(torch.float32, "highest", rel_err(eager, ref)), config


@pytest.mark.parametrize("M,K,N", [(1, 64, 33), (33, 100, 75), (300, 4104, 257)])
def test_presplit_eval_kernel_without_affine_bias_tanh_gpu(M, K, N):
    """Each pre-split 3xTF32 config of the eval kernel (`tl` and Gluon) on a block without
    bias and without BatchNorm affine, GELU in its tanh form, batch of one and odd sizes, vs
    fp64 within fp32 "highest"'s class."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend.patterns._common import kernel_kwargs

    profile, configs = _presplit_configs(lambda p: lbgr.eval_space(p, torch.float32, "tf32x3"))
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(M + K + N)
    x = torch.randn(M, K, device="cuda") * 3
    w = torch.randn(N, K, device="cuda") / K ** 0.5
    mean, var = torch.randn(N, device="cuda"), torch.rand(N, device="cuda") + 0.5
    eager = lbgr._reference(x, w, None, None, None, mean, var, 1e-5, "tanh")
    ref = lbgr._reference(x.double(), w.double(), None, None, None, mean.double(), var.double(), 1e-5, "tanh")
    for config in configs:
        out = torch.full((M, N), float("nan"), device="cuda")
        lbgr.eval_runner(x, w, None, None, None, mean, var, 1e-5, "tanh", "tf32x3", out)(kernel_kwargs(config, profile))
        assert rel_err(out, ref) <= allowed_error(torch.float32, "highest", rel_err(eager, ref)), config


def test_presplit_eval_kernel_nan_inf_gpu():
    """inf and NaN in x: the same non-finite positions as eager (cuBLAS fp32), the rest within
    fp32 "highest"'s class, for each pre-split config of the eval kernel."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend.patterns._common import kernel_kwargs

    profile, configs = _presplit_configs(
        lambda p: lbgr.eval_space(p, torch.float32, "tf32x3"))
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(9)
    M, K, N = 1000, 1000, 999
    x = torch.randn(M, K, device="cuda") * 1e4
    x[3, 7], x[10, 2] = float("inf"), float("nan")
    w = torch.randn(N, K, device="cuda") / K ** 0.5
    b, gamma, beta, mean = (torch.randn(N, device="cuda") for _ in range(4))
    var = torch.rand(N, device="cuda") + 0.5
    eager = lbgr._reference(x, w, b, gamma, beta, mean, var, 1e-5, "none")
    ref = lbgr._reference(*(t.double() for t in (x, w, b, gamma, beta, mean, var)), 1e-5, "none")
    finite = torch.isfinite(eager)
    for config in configs:
        out = torch.empty(M, N, device="cuda")
        lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", "tf32x3", out)(kernel_kwargs(config, profile))
        assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf()), config
        assert rel_err(out[finite], ref[finite]) <= allowed_error(
            torch.float32, "highest", rel_err(eager[finite], ref[finite])), config


@pytest.mark.parametrize("apply_tanh", [True, False], ids=["cell", "h2o"])
def test_presplit_cell_kernel_nan_inf_large_gpu(apply_tanh):
    """inf and NaN in the hidden state, |x| up to 1e4, odd widths (3-way cat) and a non-contiguous
    operand: the same non-finite positions as eager (cuBLAS fp32), the rest within fp32
    "highest"'s class, for each pre-split 3xTF32 config of the cell (tl and Gluon kernels)."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend.patterns._common import kernel_kwargs

    profile, configs = _presplit_configs(lambda p: clt.cell_space(p, torch.float32, "tf32x3"))
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(11)
    M, widths, N = 131, (300, 260, 52), 517
    xs = [torch.randn(M, w, device="cuda") * 1e4 for w in widths]
    xs[1] = torch.randn(widths[1], M, device="cuda").t()  # column-major: split from its strides
    xs[1][3, 7], xs[1][10, 2] = float("inf"), float("nan")
    w = torch.randn(N, sum(widths), device="cuda") / sum(widths) ** 0.5
    b = torch.randn(N, device="cuda")
    y32 = F.linear(torch.cat(xs, 1), w, b)
    y64 = F.linear(torch.cat(xs, 1).double(), w.double(), b.double())
    eager, ref = (torch.tanh(y32), torch.tanh(y64)) if apply_tanh else (y32, y64)
    finite = torch.isfinite(eager)
    assert (~finite).any() and finite.any()
    for config in configs:
        out = torch.full((M, N), 0.5, device="cuda")
        clt.runner(xs, w, b, "tf32x3", out, apply_tanh)(kernel_kwargs(config, profile))
        assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf()), config
        assert rel_err(out[finite], ref[finite]) <= allowed_error(
            torch.float32, "highest", rel_err(eager[finite], ref[finite])), config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bf16"])
@pytest.mark.parametrize("apply_tanh", [True, False], ids=["cell", "h2o"])
@pytest.mark.parametrize("M,widths,N", [(256, (4096, 4096), 4096), (37, (100, 76), 75), (1, (64, 40), 33)])
def test_wxt_cell_kernel_gpu(M, widths, N, apply_tanh, dtype):
    """Each W x^T config of the cell kernel (TF32 / bf16, split-K) against fp64, with an inf
    and a NaN in the batch: eager's non-finite positions, the rest within the class."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import devices
    from fusion_backend.patterns._common import kernel_kwargs

    profile = devices.device_profile(torch.device("cuda"))
    precision = profile.dot_precision(dtype, "high")
    configs = [c for c in clt.cell_space(profile, dtype, precision) if c.get("WXT")]
    if not configs:
        pytest.skip(f"no W x^T configs on profile {profile.name} ({profile.arch})")
    torch.manual_seed(M + N)
    xs = [(torch.randn(M, w, device="cuda") * 2).to(dtype) for w in widths]
    if M > 1:
        xs[0][M // 2, 3], xs[1][M - 1, 5] = float("inf"), float("nan")
    K = sum(widths)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    y64 = F.linear(torch.cat(xs, 1).double(), w.double(), b.double())
    with torch.no_grad():
        y = F.linear(torch.cat(xs, 1), w, b)
    ref, eager = (torch.tanh(y64), torch.tanh(y)) if apply_tanh else (y64, y)
    finite = torch.isfinite(eager)
    for config in configs:
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        clt.runner(xs, w, b, precision, out, apply_tanh)(kernel_kwargs(config, profile))
        assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf()), config
        assert rel_err(out[finite], ref[finite]) <= allowed_error(dtype, "high"), config


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_rnn_sequence_gpu_bptt(precision):
    """Gradients through the fused sequence (the recurrence's BPTT) on the GPU, against eager
    and fp64, at the issue's widths over 24 steps."""
    import copy

    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(7)
    model = UnrolledRNN(1024, 256, 128).cuda()
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, h0 = torch.randn(24, 8, 1024, device="cuda"), torch.randn(8, 256, device="cuda")
    out, h = torch.compile(model, backend="fusedtriton", options=NO_TUNE)(xs, h0)
    assert fusion_backend.counters["rnn_sequence"] == 1
    e_out, e_h = eager(xs, h0)
    r_out, r_h = model64(xs.double(), h0.double())
    (out.square().sum() + h.sum()).backward()
    (e_out.square().sum() + e_h.sum()).backward()
    (r_out.square().sum() + r_h.sum()).backward()
    assert rel_err(out, r_out) <= allowed_error(torch.float32, precision, rel_err(e_out, r_out))
    assert rel_err(h, r_h) <= allowed_error(torch.float32, precision, rel_err(e_h, r_h))
    for (name, p), (_, q), (_, r) in zip(model.named_parameters(), eager.named_parameters(),
                                         model64.named_parameters()):
        assert rel_err(p.grad, r.grad) <= allowed_error(torch.float32, precision, rel_err(q.grad, r.grad)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rnn_sequence_gpu_half(dtype):
    """fp16/bf16 sequences at the issue's widths over 32 steps: the input projection P is
    computed in fp32 (eager rounds x W_x^T + h W_h^T once) and the recurrence writes h_t in the
    model's dtype; outputs and gradients against eager and fp64."""
    torch.manual_seed(8)
    model = UnrolledRNN(1024, 256, 128).cuda().to(dtype)
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, h0 = torch.randn(32, 8, 1024, device="cuda", dtype=dtype), torch.randn(8, 256, device="cuda", dtype=dtype)
    out, h = torch.compile(model, backend="fusedtriton", options=NO_TUNE)(xs, h0)
    assert fusion_backend.counters["rnn_sequence"] == 1
    assert out.dtype == h.dtype == dtype
    e_out, e_h = eager(xs, h0)
    r_out, r_h = model64(xs.double(), h0.double())
    for got, e, r in ((out, e_out, r_out), (h, e_h, r_h)):
        assert rel_err(got, r) <= allowed_error(dtype, "high", rel_err(e, r))
    (out.float().square().sum() + h.float().sum()).backward()
    (e_out.float().square().sum() + e_h.float().sum()).backward()
    (r_out.square().sum() + r_h.sum()).backward()
    for (name, p), (_, q), (_, r) in zip(model.named_parameters(), eager.named_parameters(),
                                         model64.named_parameters()):
        assert p.grad.dtype == dtype, name
        assert rel_err(p.grad, r.grad) <= allowed_error(dtype, "high", rel_err(q.grad, r.grad)), name


class _BlockThenCell(torch.nn.Module):
    """An MLP block feeding an RNN cell: one site of each pattern."""

    def __init__(self, k=257, n=192, h=96):
        super().__init__()
        self.block = MLPBlock(k, n)
        self.i2h = torch.nn.Linear(n + h, h)

    def forward(self, x, h):
        return torch.tanh(self.i2h(torch.cat((self.block(x), h), 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_autocast_gpu(dtype, train):
    """Under CUDA autocast both sites compute in the autocast dtype from fp32 parameters, as
    eager does: outputs in that dtype within its class of fp64, fp32 gradients of the
    parameters, running statistics (train) as eager's."""
    import copy

    torch.manual_seed(41)
    model = randomize_batch_norm(_BlockThenCell(), seed=41).cuda().train(train)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h = torch.randn(300, 257, device="cuda"), torch.randn(300, 96, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = torch.compile(model, backend="fusedtriton", options=NO_TUNE)(x, h)
        e = eager(x, h)
    r = ref(x.double(), h.double())
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1 and fusion_backend.counters["cat_linear_tanh"] == 1
    assert out.dtype == e.dtype == dtype
    assert rel_err(out, r) <= allowed_error(dtype)
    out.float().square().sum().backward()
    e.float().square().sum().backward()
    r.square().sum().backward()
    for (name, p), (_, q), (_, p64) in zip(model.named_parameters(), eager.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        if train and name == "block.gemm.bias":
            # exactly zero in front of a training-mode BatchNorm: eager's and ours are rounding
            # noise, so compare sizes (a wrong BatchNorm backward gives a gradient of O(1))
            assert p.grad.norm() <= 4 * q.grad.norm() + 1e-6, (name, p.grad.norm().item(), q.grad.norm().item())
            continue
        err, eager_err = rel_err(p.grad, p64.grad), rel_err(q.grad, p64.grad)
        assert err <= max(allowed_error(dtype), 2 * eager_err), (name, err, eager_err)
    if train:
        for (name, b_ours), (_, b_eager) in zip(model.named_buffers(), eager.named_buffers()):
            assert b_ours.dtype == b_eager.dtype, name
            # the statistics are fp32 means of the autocast-dtype GEMM output; both dtypes agree
            # to fp16's rounding (bf16's class, 8x wider, would be looser than needed)
            torch.testing.assert_close(b_ours.float(), b_eager.float(), **stats_close(torch.float16),
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_run_time_trial_gpu():
    """A fused graph whose sites take well under `trial.TRIAL_BELOW_MS` of GPU time a call
    (the quickstart's MLP block at "highest") runs under the run-time trial: calls alternate
    between the fused and the original graph, every output matches eager within the class,
    and after the timed calls the graph's report, the counters and the log say which was kept."""
    from fusion_backend import trial
    from fusion_backend.backend import _report_sinks

    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(8)
    m = MLPBlock(2048, 2048).cuda().eval()
    x = torch.randn(4096, 2048, device="cuda")
    sink = []
    _report_sinks.append(sink)
    try:
        compiled = torch.compile(m, backend="fusedtriton")
        with torch.no_grad():
            ref = fp64_reference(m, x)
            eager = m(x)
            for _ in range(2 + 2 * trial.TRIAL_CALLS + 3):
                assert rel_err(compiled(x), ref) <= allowed_error(torch.float32, "highest", rel_err(eager, ref))
            torch.cuda.synchronize()
            compiled(x)  # the events are done now: this call decides
    finally:
        _report_sinks.remove(sink)
    (report,) = sink
    assert "run-time trial" in report.note and "kept" in report.note, report.note
    assert fusion_backend.counters["linear_bn_gelu_relu"] == (1 if "fused graph kept" in report.note else 0)


@pytest.mark.parametrize("M,K,N,dtype,precision", [
    (512, 1024, 1024, torch.float32, "high"),
    (37, 100, 75, torch.float32, "highest"),
    (300, 257, 192, torch.bfloat16, "highest"),
])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_inline_launch_gpu(monkeypatch, M, K, N, dtype, precision, grad, train):
    """A site whose tuned config is a pointer kernel is launched from Inductor's generated code
    (`_common.inline_meta`): the compiled code holds the kernels, not the op; outputs, running
    statistics (train) and, with grad on, gradients through the op's autograd registration
    match eager and fp64. The tuner's choice is fixed beforehand, so the test does not depend
    on which config wins. With grad on, the Linear's output is kept for the backward (the
    train op's `keep_y`, in eval mode the eval keep_y op)."""
    import copy

    from torch._inductor.utils import run_and_get_code

    from fusion_backend import autotune, devices

    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(M + K)
    m = randomize_batch_norm(MLPBlock(K, N), seed=M + K).cuda().to(dtype).train(train)
    eager, m64 = copy.deepcopy(m), copy.deepcopy(m).double()
    x = torch.randn(M, 2 * K, device="cuda", dtype=dtype)[:, ::2]  # strided: read without a copy
    profile = devices.tensor_profile(x)
    mode = "train" if train else "eval_keep_y" if grad else "eval"
    key = autotune.make_key(mode + ":linear_bn_gelu_relu", profile.tuning_id, dtype, profile.dot_precision(dtype), M, K=K, N=N)
    config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    autotune.TUNER.record(key, autotune.Choice(config, "tuned", 0.01, 0.02))
    try:
        compiled = torch.compile(m, backend="fusedtriton", options={"trial": False})
        xs = [x.detach().clone().requires_grad_(grad) for _ in range(3)]
        with torch.set_grad_enabled(grad):
            out, codes = run_and_get_code(compiled, xs[0])
            e, r = eager(xs[1]), m64(xs[2].double())
    finally:
        autotune.TUNER.choices.pop(key, None)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    forward = codes[0]
    kernel = "_gemm_bias_welford_kernel" if train else "_gemm_bn_gelu_relu_eval_kernel"
    assert kernel in forward and "torch.ops.fusedtriton" not in forward, forward[-3000:]
    err, eager_err = rel_err(out, r), rel_err(e, r)
    assert err <= allowed_error(dtype, precision, eager_err), (err, eager_err)
    if train:
        for name in ("running_mean", "running_var"):
            got, want = getattr(m.batch_norm, name), getattr(m64.batch_norm, name)
            eager_err = rel_err(getattr(eager.batch_norm, name), want)
            assert rel_err(got, want) <= max(allowed_error(dtype, precision, eager_err), 2 * eager_err), name
        assert m.batch_norm.num_batches_tracked.item() == 1
    if grad:
        g = torch.randn_like(r)
        for o, t in ((out, xs[0]), (e, xs[1]), (r, xs[2])):
            (o * g.to(o.dtype)).sum().backward()
        for name, a, b, c in (("x", xs[0].grad, xs[1].grad, xs[2].grad),
                              ("W", m.gemm.weight.grad, eager.gemm.weight.grad, m64.gemm.weight.grad)):
            err, eager_err = rel_err(a, c), rel_err(b, c)
            assert err <= max(allowed_error(dtype, precision, eager_err), 2 * eager_err), (name, err, eager_err)


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_inline_cell_launch_gpu(precision):
    """A small stateful RNN cell (KernelBench style) whose i2h and h2o sites get pointer
    configs is launched from Inductor's code: no op call in it, outputs and hidden state match
    eager and fp64 over three calls. The tuner's choices are fixed beforehand."""
    import copy

    from torch._inductor.utils import run_and_get_code

    from fusion_backend import autotune, devices
    from fusion_backend.models import VanillaRNN

    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(51)
    B, I, H, O = 64, 512, 384, 256
    m = VanillaRNN(I, H, O, B).cuda()
    eager, m64 = copy.deepcopy(m), copy.deepcopy(m).double()
    profile = devices.device_profile(torch.device("cuda"))
    dot = profile.dot_precision(torch.float32)
    keys = [autotune.make_key("cat_linear_tanh", profile.tuning_id, torch.float32, dot, B, K=f"{I}+{H}", N=H),
            autotune.make_key("cell_h2o", profile.tuning_id, torch.float32, dot, B, K=str(H), N=O)]
    config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    for key in keys:
        autotune.TUNER.record(key, autotune.Choice(config, "tuned", 0.01, 0.02))
    try:
        compiled = torch.compile(m, backend="fusedtriton", options={"trial": False})
        with torch.no_grad():
            for step in range(3):
                x = torch.randn(B, I, device="cuda")
                if step == 0:
                    out, codes = run_and_get_code(compiled, x)
                else:
                    out = compiled(x)
                e, r = eager(x), m64(x.double())
                assert rel_err(out, r) <= allowed_error(torch.float32, precision, rel_err(e, r)), step
                assert rel_err(m.hidden, m64.hidden) <= allowed_error(
                    torch.float32, precision, rel_err(eager.hidden, m64.hidden)), step
    finally:
        for key in keys:
            autotune.TUNER.choices.pop(key, None)
    assert fusion_backend.counters["cat_linear_tanh"] == 1 and fusion_backend.counters["cell_h2o"] == 1
    assert "_cat_gemm_tanh_kernel" in codes[0] and "torch.ops.fusedtriton" not in codes[0], codes[0][-3000:]


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_replayed_launch_gpu(precision, monkeypatch):
    """The cell's opaque launches replayed as CUDA graphs (`_common.replay_launch`): for the
    pre-split / Gluon (3xTF32) and W x^T (TF32) configs, over calls with fresh activations and
    after a weight changed in place, the results are the direct launch's, bit for bit; inside
    another capture the launch is direct (and captured with it)."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import devices
    from fusion_backend.patterns import _common

    profile = devices.device_profile(torch.device("cuda"))
    flag = "PRESPLIT" if precision == "tf32x3" else "WXT"
    configs = [c for c in clt.cell_space(profile, torch.float32, precision) if c.get(flag)]
    configs = [c for c in configs if c.get("GLUON")][:1] + [c for c in configs if not c.get("GLUON")][:2]
    if not configs:
        pytest.skip(f"no {flag} configs on profile {profile.name} ({profile.arch})")
    monkeypatch.setattr(_common, "_REPLAYS", {})
    torch.manual_seed(7)
    M, widths, N = 40, (100, 76), 75
    w = torch.randn(N, sum(widths), device="cuda") / 14
    b = torch.randn(N, device="cuda")
    for config in configs:
        kwargs = _common.kernel_kwargs(config, profile)
        for step in range(4):
            if step == 3:
                w.mul_(-0.5)  # in place: the graph reads the weight where it is
            xs = [torch.randn(M, k, device="cuda") for k in widths]
            direct = torch.empty(M, N, device="cuda")
            clt.runner(xs, w, b, precision, direct)(kwargs)
            out = torch.full((M, N), float("nan"), device="cuda")
            replay = _common.Replay(xs, out, (w, b), lambda ins, o, kw: clt.runner(ins, w, b, precision, o)(kw))
            got = _common.replay_launch("test", replay, kwargs, clt.runner(xs, w, b, precision, out))
            assert torch.equal(got, direct), (config, step)
        captured = [e for e in _common._REPLAYS.values() if e.kwargs is kwargs]
        assert len(captured) == 1 and isinstance(captured[0].graph, torch.cuda.CUDAGraph), config
    # inside a capture of its own (mode="reduce-overhead"): launched directly, replayed with the outer graph
    xs = [torch.randn(M, k, device="cuda") for k in widths]
    out = torch.empty(M, N, device="cuda")
    count = len(_common._REPLAYS)
    outer = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outer.capture_begin()
        replay = _common.Replay(xs, out, (w, b), lambda ins, o, kw: clt.runner(ins, w, b, precision, o)(kw))
        _common.replay_launch("test", replay, kwargs, clt.runner(xs, w, b, precision, out))
        outer.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    outer.replay()
    direct = torch.empty(M, N, device="cuda")
    clt.runner(xs, w, b, precision, direct)(kwargs)
    assert torch.equal(out, direct) and len(_common._REPLAYS) == count


@pytest.mark.parametrize("how", ["copy_", ".data"])
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_cell_hidden_written_between_forward_and_backward_gpu(how, precision):
    """The caller writes its hidden buffer after the forward, before the backward: the cell's
    op saves a copy of its operands for dW (the opaque `cat_linear_tanh_saving`; an inline op's
    copy was recomputed from the operands in the backward: on the H100 the write raised, or
    through `.data` gave dW 77% off). The h2o site still reads the cell's hidden state."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import backend

    torch.set_float32_matmul_precision(precision)
    graphs = []
    inductor = backend._inductor

    def recording(gm, example_inputs, options):
        graphs.append(gm)
        return inductor(gm, example_inputs, options)

    backend._inductor = recording
    try:
        torch.manual_seed(71)
        B, I, H, O = 8, 37, 23, 29
        cell = RNNCell(I, H, O).cuda()
        eager, ref = copy.deepcopy(cell), copy.deepcopy(cell).double()
        compiled = torch.compile(cell, backend="fusedtriton", options=NO_TUNE)
        x, h0 = torch.randn(B, I, device="cuda"), torch.randn(B, H, device="cuda")
        for m, fn, dtype in ((cell, compiled, torch.float32), (eager, eager, torch.float32),
                             (ref, ref, torch.float64)):
            h = h0.clone().to(dtype)
            out, hidden = fn(x.to(dtype), h)
            (h.data if how == ".data" else h).copy_(hidden.detach())
            out.sum().backward()
    finally:
        backend._inductor = inductor
    assert fusion_backend.counters["cat_linear_tanh"] == 1 and fusion_backend.counters["cell_h2o"] == 1
    assert any(n.target is clt.cat_linear_tanh_saving for g in graphs for n in g.graph.nodes)
    for name in ("i2h.weight", "h2o.weight"):
        got, want, r = (dict(m.named_parameters())[name].grad for m in (cell, eager, ref))
        tol = allowed_error(torch.float32, precision, eager_err=rel_err(want, r))
        assert rel_err(got, r) <= tol, (name, rel_err(got, r), rel_err(want, r))
