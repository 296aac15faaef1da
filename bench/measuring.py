"""What the benchmark was measured on, and how it measures: wall and process-CPU time, peak memory
(CUDA allocator or the peak resident set), timing in turns, and the number formatting every section
shares. Part of bench/bench.py (which puts the repository root and this folder on sys.path).
"""
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time

import numpy as np
import torch


def describe_machine(device, threads):
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "device": str(device), "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32=torch.backends.cuda.matmul.allow_tf32)
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


#################################################################################
#                                Timing & memory                                #
#################################################################################

def sync(device):
    """Wait for queued CUDA work, so a timer stops when the work is done (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field):
    """A kB field of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_memory(device):
    """Free what the last config left (garbage, CUDA cache, heap) before the next is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next RSS base is honest


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in MiB, with how it was measured."""

    def __init__(self, device):
        self.device = device

    def start(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self.base = _read_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.method = "peak RSS rise (VmHWM reset)"
        except OSError:
            self.method = "peak RSS rise (process high-water mark, not resettable: lower bound)"
        return self

    def stop(self):
        sync(self.device)
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _read_status_kib("VmHWM")
        if peak is None or self.base is None:
            return None
        return max(0, peak - self.base) / 1024


def time_calls(fn, device, warmup, iters):
    """(median wall s, median process-CPU s, first call s) over `iters` calls after `warmup` calls."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), first


def time_alternating(fns, device, warmup, iters):
    """{name: (median wall s, median process-CPU s)} of callables timed in turns (one call each per
    round, through time_calls), so load changes on a shared machine hit every one alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    walls, cpus = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            wall, cpu, _ = time_calls(fn, device, 0, 1)
            walls[k].append(wall)
            cpus[k].append(cpu)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def fmt(v, spec=".2f"):
    """A number for a table cell, "-" when it was not measured."""
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0): the cell then shows "-"."""
    return None if a is None or b is None or b == 0 else a / b
