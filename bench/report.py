"""The markdown report of a bench run: the header, the training, sampling, DiC vs DiT and latent
loading tables (the flow-matching, REPA and checkpointing ones: report_extras.py), and the timing
basis and rates they share. Part of bench/bench.py (which puts the repository root and this folder
on sys.path).
"""
from measuring import fmt, ratio
from report_extras import extras_report
from sampling_speed import CFG_SCALE

# DiC vs the DiT of similar GMACs (the DiC paper's comparisons)
PAIRS = [("DiC-S", "DiT-S/2"), ("DiC-B", "DiT-B/2"), ("DiC-XL", "DiT-XL/2"), ("DiC-H", "DiT-XL/2")]
# DiCo vs DiC and DiT at the same shape name (the DiCo paper's comparisons)
DICO_PAIRS = [("DiCo-S", "DiC-S"), ("DiCo-S", "DiT-S/2"), ("DiCo-B", "DiC-B"), ("DiCo-B", "DiT-B/2"),
              ("DiCo-XL", "DiC-XL"), ("DiCo-XL", "DiT-XL/2"), ("DiCo-H", "DiC-H")]


def timing_basis(res):
    """"cpu" when ratios use process CPU time (CPU device, one thread: steadier on a shared
    machine), else "wall"."""
    m = res["machine"]
    return "cpu" if m["gpu"] is None and m["torch_threads"] == 1 else "wall"


def train_rate(r, basis):
    """A training row's img/s on the report's timing basis (CPU time or wall)."""
    return r.get("images_per_cpu_s" if basis == "cpu" else "images_per_s")


# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets), matched against the GPU's name in
# order (PCIe before the SXM default); --peak-tflops overrides or supplies one for other devices.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("RTX 4090", 165.0))


def peak_tflops(res):
    """The device's dense bf16 peak for MFU, or None when unknown (CPUs unless given)."""
    given = res["settings"].get("peak_tflops")
    if given:
        return given
    gpu = res["machine"].get("gpu") or ""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in gpu), None)


def train_tflops(gmacs, images_per_s):
    """Achieved training TFLOP/s: forward + backward cost about 3 forwards, 2 FLOPs per MAC."""
    return 6 * gmacs * images_per_s / 1e3


def sample_latency(r, basis, sampler="DDPM-250"):
    """A sampling row's s/img for `sampler` on the report's timing basis (None if not measured)."""
    s = r.get(sampler, {})
    return s.get("per_image_cpu_s" if basis == "cpu" else "per_image_s")


def _header_lines(res, basis):
    """The command, the machine and the settings every table was measured with."""
    m, a = res["machine"], res["settings"]
    lines = ["## DiC / DiT speed benchmark", ""]
    lines.append(f"- command: `{res['command']}`")
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}, TF32 {m['tf32']})" if m["gpu"] else ""
    lines.append(f"- machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['cpu_capability']}), "
                 f"torch {m['torch']}, Python {m['python']}{gpu}; device {m['device']}; "
                 f"load average at start {fmt(m.get('load_average_1min'))}")
    lines.append(f"- torch threads: {m['torch_threads']}"
                 + (" (CPU default 1 for steady timings; --threads N to change)" if m["gpu"] is None else ""))
    lines.append(f"- training: batch {a['batch_size']}, {a['latent_size']}x{a['latent_size']} latents "
                 f"(image {a['image_size']}px), {a['warmup']} warm-up + median of {a['iters']} timed steps; "
                 f"step = diffusion.training_losses + backward + AdamW + EMA")
    lines.append(f"- sampling: {a['sample_batch']} images per batch (+ as many null-label rows), CFG {CFG_SCALE}, "
                 f"latency per image = batch latency / images"
                 + ("; **extrapolated** = median step time x steps" if a["sample_steps_scale"] < 1 else ""))
    lines.append(f"- fast = {a['fast_precision']}{' autocast' if a['fast_precision'] == 'bf16' else ''} + fused AdamW "
                 f"+ foreach EMA"
                 + (" + channels_last" if a["fast_channels_last"] else " (NCHW; --channels-last adds channels_last)")
                 + (" (+ torch.compile row)" if a["compile"] else "") + f"; {a['precision_line']}")
    lines.append("- training rows timed " + ("in turns (one step of each config per round, median per config)"
                                            if a["in_turns"] else "one config after another"))
    if basis == "cpu":
        lines.append("- **ratios (`vs eager`, DiC/DiT) use process CPU time**: with one thread it counts the "
                     "work done and not the time other processes held the cores (this machine is shared); "
                     "wall-clock columns are shown beside them.")
    lines.append("")
    return lines


def _training_lines(res, basis, by):
    """The training throughput table (img/s, vs eager, TFLOP/s, MFU, peak memory) and its notes."""
    lines = ["### Training throughput", "",
             "| model | params (M) | GMACs | GMACs (paper, 256px) | config | ms/step (wall) | img/s (wall) | "
             "img/s (CPU time) | vs eager | TFLOP/s (wall) | MFU | peak MiB |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    peak = peak_tflops(res)
    for name, r in res["models"].items():
        base = r["train"].get("eager fp32", {})
        for cfg, t in r["train"].items():
            if "error" in t:
                lines.append(f"| {name} | | | | {cfg} | {t['error']} | | | | | | |")
                continue
            label = cfg + (f" (first step {t['first_step_s']:.0f} s: compiling)" if t.get("compile") else "")
            tflops = train_tflops(r["gmacs"], t["images_per_s"])
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
            lines.append(
                f"| {name} | {r['params'] / 1e6:.1f} | {r['gmacs']:.2f} | {fmt(r['gmacs_paper'])} | {label} | "
                f"{t['step_s'] * 1000:.0f} | {t['images_per_s']:.2f} | {fmt(t['images_per_cpu_s'])} | "
                f"{fmt(ratio(train_rate(t, basis), train_rate(base, basis)))}x | {tflops:.3g} | {mfu} | "
                f"{fmt(t['peak_mib'], '.0f')} |")
    lines.append("")
    lines.append(f"`vs eager` = img/s ratio to the same model's eager fp32 row ({by}). TFLOP/s = "
                 f"6 x GMACs x img/s (forward + backward ~ 3 forwards); MFU = TFLOP/s / the device's dense "
                 f"bf16 peak ({fmt(peak, '.0f')} TFLOP/s; --peak-tflops sets it).")
    lines.append("")
    return lines


def _sampling_lines(res, basis, by):
    """The DDPM-250 / DDIM-50 latency table and its notes."""
    lines = ["### Sampling latency per image", "",
             "| model | config | DDPM-250 s/img (wall) | DDIM-50 s/img (wall) | DDPM-250 s/img (CPU time) | "
             "ms/step (batch, wall) | timed steps | vs eager | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        base = r["sample"].get("eager fp32", {})
        for cfg, s in r["sample"].items():
            if "error" in s:
                lines.append(f"| {name} | {cfg} | {s['error']} | | | | | | |")
                continue
            ddpm, ddim = s["DDPM-250"], s["DDIM-50"]
            label = cfg + (f" (compiling {s['compile_s']:.0f} s)" if "compile_s" in s else "")
            lines.append(
                f"| {name} | {label} | {ddpm['per_image_s']:.2f}{' (extrapolated)' if ddpm['extrapolated'] else ''} | "
                f"{ddim['per_image_s']:.2f}{' (extrapolated)' if ddim['extrapolated'] else ''} | "
                f"{ddpm['per_image_cpu_s']:.2f} | {ddpm['step_s'] * 1000:.1f} | "
                f"{ddpm['timed_steps']}/{ddpm['steps']}, {ddim['timed_steps']}/{ddim['steps']} | "
                f"{fmt(ratio(sample_latency(base, basis), sample_latency(s, basis)))}x | "
                f"{fmt(s.get('peak_mib'), '.0f')} |")
    lines.append("")
    lines.append(f"`vs eager` = eager DDPM-250 latency / this one ({by}). A DDPM and a DDIM step cost the "
                 "same (one guided forward), so DDIM-50 = DDPM-250 / 5 up to noise.")
    lines.append("")
    return lines


def _pairs_lines(res, basis, by, pairs=PAIRS, title="DiC vs DiT of similar GMACs", first="DiC", second="DiT"):
    """`first` vs `second` models (training and sampling ratios), where both were measured; by default DiC
    vs the DiT of similar GMACs."""
    lines = []
    pairs = [(d, t) for d, t in pairs if d in res["models"] and t in res["models"]]
    if pairs:
        lines += [f"### {title}", "",
                  f"Ratios {by}; > 1 means {first} is faster.", "",
                  f"| {first} | {second} | GMACs | train img/s {first}/{second} (eager) | (fast) | sampling speed-up "
                  f"{first} vs {second} (eager) | (fast) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for d, t in pairs:
            rd, rt = res["models"][d], res["models"][t]

            def tr(cfg):
                return ratio(train_rate(rd["train"].get(cfg, {}), basis), train_rate(rt["train"].get(cfg, {}), basis))

            def sp(cfg):
                return ratio(sample_latency(rt["sample"].get(cfg, {}), basis),
                             sample_latency(rd["sample"].get(cfg, {}), basis))
            lines.append(f"| {d} | {t} | {rd['gmacs']:.2f} vs {rt['gmacs']:.2f} | {fmt(tr('eager fp32'))}x | "
                         f"{fmt(tr('fast'))}x | {fmt(sp('eager fp32'))}x | {fmt(sp('fast'))}x |")
        lines.append("")
    return lines


def _latent_loading_lines(res, by):
    """The latent loading table: samples/s of each reader against training's consumption."""
    a = res["settings"]
    d = res["data"]
    consume = res.get("consumption")
    lines = ["### Latent loading", "",
             f"{d['samples']:,} synthetic (1, 4, {a['latent_size']}, {a['latent_size']}) float32 latents, "
             f"random-order batches of {d['batch']}, {d['note']}. Writing them took "
             f"{d['write_per_file_s']:.1f} s as per-file .npy vs {d['write_packed_s']:.2f} s as one "
             f"plain-numpy packed array; helpers.data.packing.pack_latents converted the per-file set in "
             f"{fmt(d.get('pack_latents_s'), '.1f')} s.", "",
             "| reader | samples/s (wall) | vs training consumption |", "|---|---:|---:|"]
    for label, r in d["readers"].items():
        lines.append(f"| {label} | {r['samples_per_s']:,.0f} | "
                     f"{fmt(ratio(r['samples_per_s'], consume['images_per_s']) if consume else None, '.0f')}x |")
    if consume:
        lines.append("")
        lines.append(f"Training consumption: {consume['images_per_s']:.2f} img/s ({consume['model']}, "
                     f"{consume['config']}, this device, {by}). Above 1x one reader thread keeps up.")
    lines.append("")
    return lines


def markdown_report(res):
    """The whole report: header, training, sampling, DiC vs DiT, the extra sections, latent loading."""
    basis = timing_basis(res)
    by = "by CPU time" if basis == "cpu" else "wall clock"
    lines = _header_lines(res, basis)
    lines += _training_lines(res, basis, by)
    lines += _sampling_lines(res, basis, by)
    lines += _pairs_lines(res, basis, by)
    lines += _pairs_lines(res, basis, by, DICO_PAIRS, "DiCo vs DiC and DiT", "DiCo", "other")
    lines += extras_report(res, basis, by)
    if res.get("data"):
        lines += _latent_loading_lines(res, by)
    lines.append(f"Total bench time: {res['elapsed_s']:.0f} s.")
    return "\n".join(lines)
