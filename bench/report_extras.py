"""The markdown of the flow-matching, SiT sampling, REPA and gradient checkpointing sections of the
bench report. Part of bench/bench.py (which puts the repository root and this folder on sys.path).
"""
from measuring import fmt, ratio
from sampling_speed import CFG_SCALE
from sit_repa import SIT_SOLVERS


def _sit_train_lines(res, basis, by):
    """The SiT vs DDPM training step table."""
    a, lines = res["settings"], []
    key = "cpu_s" if basis == "cpu" else "step_s"
    sit_train = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("sit_train", {}).items()]
    if sit_train:
        lines += ["### Flow-matching (SiT) training step", "",
                  f"SiT objective (Linear path, velocity, model with learn_sigma=False) vs DDPM (eps + VB, "
                  f"learned sigma), batch {a['batch_size']}, the same config, steps timed in turns.", "",
                  "| model | config | DDPM img/s (wall) | SiT img/s (wall) | DDPM img/s (CPU time) | "
                  "SiT img/s (CPU time) | SiT step / DDPM step |", "|---|---|---:|---:|---:|---:|---:|"]
        for n, c, r in sit_train:
            d, s = r["DDPM"], r["SiT"]
            lines.append(f"| {n} | {c} | {d['images_per_s']:.2f} | {s['images_per_s']:.2f} | "
                         f"{d['images_per_cpu_s']:.2f} | {s['images_per_cpu_s']:.2f} | "
                         f"{fmt(ratio(s[key], d[key]))}x |")
        lines += ["", f"Step-time ratio {by}; < 1 means the SiT step is cheaper.", ""]
    return lines


def _sit_sample_lines(res, basis, by):
    """The SiT ODE/SDE sampling latency table (NFE counted) and what dopri5's NFE means here."""
    a, lines = res["settings"], []
    sit_sample = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("sit_sample", {}).items()]
    if sit_sample:
        lines += ["### SiT ODE/SDE sampling latency per image", "",
                  f"helpers.sampling.samplers.ReverseProcess with sample.py's SiT defaults (atol 1e-6, rtol 1e-3; SDE "
                  f"diffusion 'sigma', last step Mean 0.04), learn_sigma=False model, {a['sample_batch']} images "
                  f"+ as many null-label rows, CFG {CFG_SCALE}. Each cell: s/img (wall) and NFE (model calls).", "",
                  "| model | config | " + " | ".join(label for label, *_ in SIT_SOLVERS) +
                  " | ms per NFE (batch, wall) | s/img by CPU time (" + SIT_SOLVERS[-1][0] + ") |",
                  "|---|---|" + "---:|" * (len(SIT_SOLVERS) + 2)]
        for n, c, r in sit_sample:
            cells = []
            for label, *_ in SIT_SOLVERS:
                s = r[label]
                mark = "" if not s["extrapolated"] else \
                    (" (extrapolated from euler's s/NFE)" if s["timed_nfe"] == 0 else
                     f" (extrapolated from {s['timed_nfe']} NFE)")
                cells.append(f"{s['per_image_s']:.2f}, NFE {s['nfe']}{mark}")
            last = r[SIT_SOLVERS[-1][0]]
            lines.append(f"| {n} | {c} | " + " | ".join(cells) + f" | {last['ms_per_nfe']:.0f} | "
                         f"{last['per_image_cpu_s']:.2f} |")
        zero = all(r.get("zero_field") for _, _, r in sit_sample)
        lines += ["", "Every NFE is one guided forward (batch 2n), the cost of a DDPM step, so latency ~ NFE x "
                  "ms per NFE / n. **dopri5's NFE here is not representative of a trained model**: "
                  + ("these models are randomly initialised with a zero-initialised final layer (adaLN-Zero), "
                     "so their velocity field is exactly 0 and dopri5's NFE comes from its step-size control "
                     "alone (counted on a zero field, identical for it); " if zero else
                     "with random weights the field is not a trained model's; ")
                  + "a trained model's NFE, and so its latency, is set by the learned field (rerun with a "
                  "checkpoint through sample.py, which reports the NFE). The fixed-step rows do not depend "
                  "on the weights: euler-50 49 NFE, heun2-50 98, SDE Euler-250 500 (SiT's SDE drift calls "
                  "the model twice per step on the same input, once for the velocity and once for the "
                  "score: transport.Sampler.sample_sde).", ""]
    return lines


def _repa_lines(res, basis, by):
    """The REPA step cost table (plain vs REPA step, encoder alone)."""
    a, lines = res["settings"], []
    key = "cpu_s" if basis == "cpu" else "step_s"
    repa = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("repa", {}).items()]
    if repa:
        r0 = repa[0][2]
        lines += ["### REPA step cost", "",
                  f"SiT step vs SiT + REPA step on the same batch ({r0['batch']} latents + their "
                  f"{a['image_size']} px images), "
                  f"timed in turns: encoder {r0['encoder_name']} on preprocess(images) "
                  f"({a['image_size'] * 224 // 256} px), projector "
                  f"(REPA's MLP 2048-2048, 1x1 convs on DiC's map) on the stage's features from the same "
                  f"forward, -cos projection loss x 0.5, backward through model and projector, AdamW over "
                  f"both, EMA.", "",
                  "| model | config | stage | encoder precision | projector params (M) | plain step ms (wall) | "
                  "REPA step ms (wall) | encoder forward ms (wall) | REPA / plain | encoder / plain |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for n, c, r in repa:
            lines.append(f"| {n} | {c} | {r['stage']} | {r['encoder_precision']} | {r['projector_params'] / 1e6:.1f} | "
                         f"{r['plain']['step_s'] * 1000:.0f} | {r['REPA']['step_s'] * 1000:.0f} | "
                         f"{r['encoder']['step_s'] * 1000:.0f} | {fmt(ratio(r['REPA'][key], r['plain'][key]))}x | "
                         f"{fmt(ratio(r['encoder'][key], r['plain'][key]))}x |")
        lines += ["", f"Ratios {by}. The encoder has random weights (DINOv2's cannot be downloaded here): "
                  "the same cost as the real ones. On GPU the encoder may run in bf16 (it runs under the "
                  "config's autocast here: fp32 in eager rows, bf16 in fast rows).", ""]
    return lines


def _grad_checkpointing_lines(res, basis, by):
    """The gradient checkpointing table (peak memory and step time, off vs on)."""
    lines = []
    gc = res.get("grad_checkpointing")
    if gc:
        lines += ["### Gradient checkpointing", "",
                  "One fp32 forward + backward (DDPM loss, no optimizer step) with and without "
                  "`model.set_grad_checkpointing(True)` (per block, non-reentrant), same batch; weights and "
                  "grads are allocated before the measured step, so the peak is activations and temporaries "
                  f"({next(iter(gc.values())).get('memory_method', '-')}).", "",
                  "| model | params (M) | batch | weights + grads MiB | peak MiB off | peak MiB on | on / off | "
                  "step s off (wall) | step s on (wall) | step time on / off |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        key_off, key_on = ("cpu_s_off", "cpu_s_on") if basis == "cpu" else ("step_s_off", "step_s_on")
        for n, r in gc.items():
            if "error" in r:
                lines.append(f"| {n} | {r['params'] / 1e6:.0f} | {r['batch']} | | {r['error']} | | | | | |")
                continue
            lines.append(f"| {n} | {r['params'] / 1e6:.1f} | {r['batch']} | {8 * r['params'] / 2**20:.0f} | "
                         f"{fmt(r['peak_mib_off'], '.0f')} | {fmt(r['peak_mib_on'], '.0f')} | "
                         f"{fmt(ratio(r['peak_mib_on'], r['peak_mib_off']))} | {r['step_s_off']:.2f} | "
                         f"{r['step_s_on']:.2f} | {fmt(ratio(r[key_on], r[key_off]))}x |")
        lines += ["", f"Step-time ratio {by} (checkpointing recomputes each block's forward in the backward).", ""]
    return lines


def extras_report(res, basis, by):
    """Markdown of the flow-matching, SiT sampling, REPA and gradient checkpointing sections."""
    return (_sit_train_lines(res, basis, by) + _sit_sample_lines(res, basis, by)
            + _repa_lines(res, basis, by) + _grad_checkpointing_lines(res, basis, by))
