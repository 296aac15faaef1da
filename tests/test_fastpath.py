"""helpers/utils/fastpath.py: the speed switches keep the numbers (or change them by a measured bound).

Relative error below is ||out - ref|| / ||ref|| over the whole output tensor.
Models get small random perturbations of every parameter first: DiC and DiT zero-initialise
their output heads, and a zero output would make every comparison trivially pass.
"""
import copy
import os
import subprocess
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext

import pytest
import torch

from conftest import load_bench_module
from helpers.utils import fastpath
from helpers.utils.cli import JobError, run_main
from helpers.utils.fastpath import (Bf16Support, busy_cores, adamw_implementation, autocast_context, autocast_forward,
                              bf16_support, choose_precision, cpu_bf16_support, fastest_settings, precision_line,
                              channels_last_input, check_precision, configure_tf32, contiguous_optimizer_state,
                              contiguous_state_dict, describe, ema_update,
                              ema_update_reference, fused_choice, load_optimizer_state, make_adamw,
                              maybe_compile, optimizer_implementation, to_channels_last, unwrap_compiled)
from helpers.utils.models import create_model


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def perturbed(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def batch(n, size=32, seed=0, num_classes=1000):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, num_classes, (n,), generator=g))


@pytest.fixture(scope="module")
def dic_s():
    return perturbed("DiC-S").eval()


# ----------------------------------------------------------------- precision ----

AVX2 = dict(mkldnn_bf16=False, avx512_bf16=False, amx=False, capability="AVX2", x86=True)
ZEN4 = dict(mkldnn_bf16=True, avx512_bf16=True, amx=False, capability="AVX512", x86=True)


@pytest.fixture(params=["avx2", "avx512-bf16"])
def cpu_probe(request, monkeypatch):
    """The CPU probe patched to an AVX2-only CPU or one with AVX512-BF16; DIC_FORCE_BF16 unset."""
    flags = AVX2 if request.param == "avx2" else ZEN4
    monkeypatch.setattr(fastpath, "cpu_bf16_flags", lambda: dict(flags))
    monkeypatch.delenv(fastpath.FORCE_BF16_ENV, raising=False)
    return flags


def test_cpu_bf16_support_from_the_probe():
    assert cpu_bf16_support(AVX2) == Bf16Support("cpu", fast=False, native=False, hardware="AVX2")
    assert cpu_bf16_support(ZEN4) == Bf16Support("cpu", fast=True, native=True, hardware="AVX512-BF16")
    skylake = dict(ZEN4, avx512_bf16=False)   # oneDNN emulates bf16 with AVX512: fast, not native
    assert cpu_bf16_support(skylake) == Bf16Support("cpu", fast=True, native=False, hardware="AVX512")
    assert cpu_bf16_support(dict(ZEN4, amx=True)).hardware == "AMX"
    arm = dict(AVX2, mkldnn_bf16=True, capability="SVE256", x86=False)
    assert cpu_bf16_support(arm) == Bf16Support("cpu", fast=True, native=True, hardware="bf16 instructions")


def test_auto_precision_is_tf32_and_bf16_is_refused_where_it_would_crawl(cpu_probe, monkeypatch):
    """auto -> tf32 (plain fp32 on CPU) on both CPUs; the line says what bf16 would do here. An
    explicit bf16 runs where the CPU has bf16, and is refused with the fix on an AVX2 one
    (DIC_FORCE_BF16=1 runs it anyway, and the line says so)."""
    line = precision_line(choose_precision("auto", "cpu"), bf16_support("cpu"))
    assert choose_precision("auto", "cpu") == "tf32" and choose_precision("fp32", "cpu") == "fp32"
    assert line.startswith("precision: tf32 (plain fp32 on cpu); ")
    if cpu_probe is AVX2:
        assert line.endswith("this CPU has no bf16 instructions (AVX2): bf16 would run reference kernels, "
                             "~40x slower than fp32, so auto never picks it")
        with pytest.raises(JobError, match=r"^--precision bf16: this CPU has no bf16 instructions \(AVX2\): bf16 "
                                           r"would run reference kernels, ~40x slower than fp32; use --precision "
                                           r"fp32 \(or auto\), or set DIC_FORCE_BF16=1 to run bf16 anyway$"):
            choose_precision("bf16", "cpu")
        with pytest.raises(JobError, match="^accelerate's mixed_precision bf16: .*launch without --mixed_precision"):
            choose_precision("auto", "cpu", accelerate="bf16")
        monkeypatch.setenv(fastpath.FORCE_BF16_ENV, "1")
        assert choose_precision("bf16", "cpu") == "bf16"
        assert "forced by DIC_FORCE_BF16=1; this CPU has no bf16" in precision_line("bf16", bf16_support("cpu"))
    else:
        assert "this CPU has bf16 instructions (AVX512-BF16): --precision bf16" in line and "opt-in" in line
        assert choose_precision("bf16", "cpu") == "bf16"
        assert choose_precision("auto", "cpu", accelerate="bf16") == "tf32"   # accelerate runs the autocast
        assert precision_line("bf16", bf16_support("cpu")) == "precision: bf16 (bf16 autocast on cpu)"
    with pytest.raises(JobError, match="--precision 'fp16': choose one of auto, fp32, tf32, bf16"):
        choose_precision("fp16", "cpu")


def test_fastest_settings_follow_the_cpu_and_the_load():
    """bf16 only with bf16 instructions; NCHW, no compile; the idle cores' threads, at least one."""
    zen4, avx2 = cpu_bf16_support(ZEN4), cpu_bf16_support(AVX2)
    fast = fastest_settings("cpu", zen4, busy=0.2, cores=8)
    assert (fast["precision"], fast["channels_last"], fast["compile"], fast["threads"]) == ("bf16", False, False, 8)
    assert fastest_settings("cpu", zen4, busy=0.6, cores=2)["threads"] == 1
    assert fastest_settings("cpu", avx2, busy=5.6, cores=2)["precision"] == "fp32"
    assert fastest_settings("cpu", avx2, busy=5.6, cores=2)["threads"] == 1
    assert "AVX2: fp32 (no bf16 instructions); 1 thread(s): 5.6 of 2 cores busy" in \
        fastest_settings("cpu", avx2, busy=5.6, cores=2)["why"]
    h100 = Bf16Support("cuda", True, True, "NVIDIA H100")
    assert fastest_settings("cuda", h100)["precision"] == "bf16" and fastest_settings("cuda", h100)["threads"] is None


def test_busy_cores_sees_a_spinning_process_at_once():
    """A busy core counts while it spins, not a minute later (the load average's lag)."""
    idle = busy_cores(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0 <= idle <= os.cpu_count() and 0.8 <= busy <= os.cpu_count() + 1e-9


def test_scripts_settle_precision_with_the_probe(cpu_probe, tmp_path):
    """train.py refuses bf16 on the AVX2 CPU before any work (exit 2, the one line); the samplers'
    setup_speed settles auto and says it in one line; the bench's fast rows take fp32 there."""
    import argparse
    import train
    fast_precision = load_bench_module("configs").fast_precision
    from helpers.sampling.flags import setup_speed
    lines = []
    speed = setup_speed(argparse.Namespace(precision="auto", channels_last=False, compile=False), "cpu", lines.append)
    assert speed["precision"] == "tf32" and lines[0].startswith("precision: tf32 (plain fp32 on cpu); ")
    assert fast_precision("auto", "cpu")[0] == ("fp32" if cpu_probe is AVX2 else "bf16")
    if cpu_probe is AVX2:
        args = train.parse_args(["--dataset", "digits", "--model", "DiC-Tiny", "--precision", "bf16",
                                 "--results-dir", str(tmp_path)])
        assert run_main(train.main, args) == 2 and not os.listdir(tmp_path)
        with pytest.raises(JobError, match="^--fast-precision bf16: this CPU has no bf16 instructions"):
            fast_precision("bf16", "cpu")


def test_autocast_context_kinds():
    assert isinstance(autocast_context("cpu", "fp32"), nullcontext)
    assert isinstance(autocast_context("cpu", "tf32"), nullcontext)
    assert isinstance(autocast_context("mps", "bf16"), nullcontext)  # only CPU/CUDA autocast
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*fp32, tf32, bf16"):
        autocast_context("cpu", "fp16")
    assert check_precision("bf16") == "bf16"


def test_configure_tf32_round_trip():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_autocast_within_bound(dic_s):
    # Measured on this CPU (DiC-S, batch 2, 32x32, 3 seeds): 1.07e-2 to 1.08e-2 relative
    # (DiC-Tiny 0.8e-2, DiT-S/2 0.44e-2). Bound 4e-2: ~4x the typical error, far below the
    # error of a broken cast (O(1)).
    x, t, y = batch(2)
    with torch.no_grad():
        ref = dic_s(x, t, y)
        out = autocast_forward(dic_s, "cpu", "bf16")(x, t, y)
    assert out.dtype == torch.float32  # autocast_forward hands fp32 to the loss
    err = rel_err(out, ref)
    assert 1e-4 < err < 4e-2, err  # > 1e-4: bf16 really ran
    assert autocast_forward(dic_s, "cpu", "fp32") is dic_s


# ------------------------------------------------------------- memory format ----

def test_channels_last_forward_equals_eager(dic_s):
    x, t, y = batch(1)
    fast = to_channels_last(copy.deepcopy(dic_s))
    assert fast.x_embedder.proj.weight.is_contiguous(memory_format=torch.channels_last)
    xc = channels_last_input(x)
    assert xc.is_contiguous(memory_format=torch.channels_last) and torch.equal(xc, x)
    with torch.no_grad():
        ref = dic_s(x, t, y)
        out = fast(xc, t, y)
    assert ref.abs().max() > 1e-2
    assert rel_err(out, ref) < 1e-5  # measured 1.6e-6 (summation order only)


def test_channels_last_gradients_equal_eager():
    model = perturbed("DiC-Tiny", num_classes=10).train()
    fast = to_channels_last(copy.deepcopy(model))
    x, t, y = batch(2, size=16, num_classes=10)
    drop = torch.tensor([0, 1])  # class dropout drawn identically for both
    for m, inp in ((model, x), (fast, channels_last_input(x))):
        (m(inp, t, y, force_drop_ids=drop) ** 2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        if p.grad is not None and p.grad.norm() > 0:
            assert rel_err(q.grad, p.grad) < 1e-4, name
    # shapes and names unchanged: the state_dict loads into a plain model
    create_model("DiC-Tiny", num_classes=10).load_state_dict(fast.state_dict(), strict=True)


def test_contiguous_state_dicts_of_a_channels_last_model():
    model = to_channels_last(perturbed("DiC-Tiny", num_classes=10))
    sd = model.state_dict()
    assert not all(v.is_contiguous() for v in sd.values())
    plain = contiguous_state_dict(sd)
    assert list(plain) == list(sd) and all(v.is_contiguous() and torch.equal(v, sd[k]) for k, v in plain.items())
    assert all(plain[k] is v for k, v in sd.items() if v.is_contiguous())   # no copy where none is needed
    opt = make_adamw(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = contiguous_optimizer_state(opt.state_dict())
    assert state["param_groups"] == opt.state_dict()["param_groups"]
    assert all(v.is_contiguous() for per in state["state"].values() for v in per.values())


def test_channels_last_input_leaves_other_ranks():
    v = torch.randn(3, 5)
    assert channels_last_input(v) is v


# ------------------------------------------------------------------- compile ----

def test_maybe_compile_disabled_is_identity():
    m = torch.nn.Linear(2, 2)
    assert maybe_compile(m, False) is m
    assert unwrap_compiled(m) is m


@pytest.mark.slow
def test_compile_equals_eager():
    model = perturbed("DiC-Tiny", num_classes=10).eval()
    compiled = maybe_compile(model, True)
    assert unwrap_compiled(compiled) is model
    x, t, y = batch(2, size=16, num_classes=10)
    with torch.no_grad():
        ref = model(x, t, y)
        out = compiled(x, t, y)
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------- optimizer ----

def _run_adamw(make, base, steps=5):
    model = copy.deepcopy(base)
    opt = make(model.parameters())
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_make_adamw_matches_plain_adamw():
    base = perturbed("DiC-Tiny", num_classes=10)
    lr, wd = 1e-3, 0.01
    ref, _ = _run_adamw(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=False), base)
    # CPU: fused kernel since torch 2.4 (about 5x faster than the for-loop on DiC-S)
    assert adamw_implementation(list(base.parameters())) == "fused"
    fused, opt = _run_adamw(lambda ps: make_adamw(ps, lr=lr, weight_decay=wd), base)
    group = opt.param_groups[0]
    assert group["fused"] and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert not group["amsgrad"] and group["lr"] == lr and group["weight_decay"] == wd
    # fused: float rounding only (measured max |diff| 1.5e-8 on weights of size ~0.1-1)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the non-fused choice on CPU is torch's for-loop; forced foreach is bit-identical to it
    assert adamw_implementation(list(base.parameters()), fused=False) == "for-loop"
    foreach, _ = _run_adamw(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=True), base)
    assert all(torch.equal(a, b) for a, b in zip(foreach, ref))
    loop, _ = _run_adamw(lambda ps: make_adamw(ps, lr=lr, weight_decay=wd, fused=False), base)
    assert all(torch.equal(a, b) for a, b in zip(loop, ref))


def test_make_adamw_errors():
    with pytest.raises(ValueError, match="fused must be"):
        make_adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, fused="yes")


def test_fused_choice_and_describe():
    assert (fused_choice("auto"), fused_choice("on"), fused_choice("off")) == ("auto", True, False)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        fused_choice(True)
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_implementation(make_adamw(p, lr=1e-4)) == "fused"
    assert optimizer_implementation(make_adamw(p, lr=1e-4, fused=False)) == "for-loop"
    assert optimizer_implementation(torch.optim.AdamW(p, lr=1e-4, foreach=True)) == "foreach"
    assert (describe("tf32", "fused", False, False)
            == "fast path: precision tf32, AdamW fused, EMA foreach, channels_last off, compile off")


def test_load_optimizer_state_keeps_the_kernel_and_layout():
    """torch's load_state_dict takes the saved fused/foreach flags; load_optimizer_state keeps the
    optimizer's own kernel and gives the buffers the parameters' layout; values copied exactly."""
    base = perturbed("DiC-Tiny", num_classes=10)
    _, saved_by = _run_adamw(lambda ps: torch.optim.AdamW(ps, lr=1e-3), base, steps=2)   # torch default: for-loop
    saved = saved_by.state_dict()
    assert saved["param_groups"][0]["fused"] is None

    plain = torch.optim.AdamW(copy.deepcopy(base).parameters(), lr=1e-3, fused=True)
    plain.load_state_dict(saved)
    assert not plain.param_groups[0]["fused"]          # the problem: torch switched kernels

    model = to_channels_last(copy.deepcopy(base))
    opt = load_optimizer_state(make_adamw(model.parameters(), lr=1e-3), saved)
    assert opt.param_groups[0]["fused"] is True and optimizer_implementation(opt) == "fused"
    for i, p in enumerate(model.parameters()):
        state, ref = opt.state[p], saved["state"][i]
        assert state["step"].dtype == torch.float32 and state["step"].item() == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], ref[key]) and state[key].stride() == p.stride()
    loop = load_optimizer_state(make_adamw(copy.deepcopy(base).parameters(), lr=1e-3, fused=False),
                                opt.state_dict())
    assert optimizer_implementation(loop) == "for-loop" and not loop.param_groups[0]["fused"]


# ----------------------------------------------------------------------- EMA ----

@torch.no_grad()
def dit_update_ema(ema_model, model, decay=0.9999):
    """DiT's train.py update_ema, written out as the independent reference."""
    ema_params = OrderedDict(ema_model.named_parameters())
    model_params = OrderedDict(model.named_parameters())
    for name, param in model_params.items():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def test_ema_update_equals_dit_up_to_rounding():
    """One foreach lerp vs DiT's mul_ + add_: per step within eps * (|ema| + |param|) elementwise
    (measured up to 0.99x that), for the paper's decay, the quick start's, a warm-up one and 0.1;
    the reference copy equals DiT's bit for bit; decay 0 copies the parameters exactly."""
    eps = torch.finfo(torch.float32).eps
    model = perturbed("DiC-Tiny", num_classes=10)
    ema = perturbed("DiC-Tiny", seed=1, num_classes=10)
    for decay in (0.9999, 0.999, 0.5, 0.1):
        ema_a, ema_b, ema_c = copy.deepcopy(ema), copy.deepcopy(ema), copy.deepcopy(ema)
        dit_update_ema(ema_a, model, decay)
        ema_update(ema_b, model, decay)
        ema_update_reference(ema_c, model, decay)
        for a, b, c, e, p in zip(ema_a.parameters(), ema_b.parameters(), ema_c.parameters(), ema.parameters(),
                                 model.parameters()):
            assert torch.equal(a, c)
            assert ((b - a).abs() <= eps * (e.abs() + p.abs())).all(), decay
            assert not torch.equal(b, e)
    ema_update(ema, model, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_ema_update_accepts_compiled_wrapper_and_rejects_mismatch():
    model = perturbed("DiC-Tiny", num_classes=10)
    ema, ref = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper exposes: names prefixed `_orig_mod.`
    ema_update(ema, wrapped, 0.5)
    dit_update_ema(ref, model, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), ref.parameters()))
    with pytest.raises(ValueError, match="EMA and model parameters differ"):
        ema_update(torch.nn.Linear(2, 2), model, 0.5)


# --------------------------------------------------------------------- bench ----

def test_bench_gmacs_match_papers():
    bench = load_bench_module("bench")
    # DiC paper / shared/spec/DIC.md (2 decimals) and DiT's ~118.6 for DiT-XL/2, at 256px
    for name, paper in (("DiC-S", 5.87), ("DiC-B", 23.44), ("DiC-XL", 116.10), ("DiC-H", 204.32),
                        ("DiT-XL/2", 118.6)):
        gmacs, params = bench.count_gmacs(name, 32)
        assert abs(gmacs - paper) < 0.05, (name, gmacs)
    assert params == 675_129_632


def test_bench_runs_end_to_end(tmp_path):
    """A seconds-long run of the one-command benchmark: every section is produced and sane."""
    import json
    bench = load_bench_module("bench")
    out = tmp_path / "bench.json"
    # main() switches TF32 on (the official setting); give the other tests the flags back
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        bench.main(["--models", "DiC-Tiny", "--image-size", "64", "--batch-size", "2", "--warmup", "0",
                    "--iters", "1", "--sample-batch", "1", "--min-sample-steps", "1", "--no-ablation",
                    "--data-samples", "40", "--data-batch", "16", "--peak-tflops", "0.5",
                    "--json", str(out)])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    res = json.loads(out.read_text())
    tiny = res["models"]["DiC-Tiny"]
    assert set(tiny["train"]) == {"eager fp32", "fast"} and set(tiny["sample"]) == {"eager fp32", "fast"}
    # the fast rows' precision: bf16 where the CPU has bf16 instructions, else fp32 (said in the header)
    fast_precision = "bf16" if bf16_support("cpu").native else "fp32"
    assert tiny["train"]["fast"]["precision"] == fast_precision and tiny["train"]["fast"]["optimizer"] == "fused"
    assert res["settings"]["in_turns"] and all(r["timing"] == "in turns" for r in tiny["train"].values())
    assert f"fast rows: precision: {fast_precision}" in res["markdown"]
    assert all(r["images_per_s"] > 0 for r in tiny["train"].values())
    ddpm = tiny["sample"]["fast"]["DDPM-250"]
    assert ddpm["extrapolated"] and ddpm["steps"] == 250 and ddpm["timed_steps"] == 3
    assert ddpm["batch_latency_s"] == pytest.approx(ddpm["step_s"] * 250)
    assert len(res["data"]["readers"]) == 4
    # MFU column: 6 x GMACs x img/s (forward + backward) over the given 0.5 TFLOP/s peak
    fast = tiny["train"]["fast"]
    tflops = 6 * tiny["gmacs"] * fast["images_per_s"] / 1e3
    assert f"| {tflops:.3g} | {100 * tflops / 0.5:.1f}% |" in res["markdown"]
    assert "extrapolated" in res["markdown"] and "### Latent loading" in res["markdown"]
    with pytest.raises(SystemExit):  # never overwrites a results file
        bench.main(["--models", "DiC-Tiny", "--json", str(out)])
