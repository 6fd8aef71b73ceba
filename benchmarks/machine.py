"""How fast is this machine? A short built-in peak probe, recorded beside every measured time.

    python -m benchmarks.machine          # prints the note as JSON (about 2.5 s)

Absolute seconds from two machines (or from one machine while other jobs share it) are not
comparable; the achieved GFLOP/s of a plain square matmul measured in the same process is the
yardstick: `benchmarks.utilisation` divides a method's achieved FLOP/s by it, and the results row
keeps `machine_note()` so a time can be read against the speed of the machine that produced it.

What is measured: C = A @ B for square n x n matrices (n = 2048 by default), 2 n^3 FLOPs each; one
untimed warm-up, then timed repeats until the time budget is spent (at least `min_repeats`);
the best repeat counts (the least disturbed by other processes: a peak, not a mean); where one such
product would take more than a quarter of the budget (bf16 on a CPU without bf16 units), n is halved
until it fits. bf16 is the precision the CPU presets train in where the CPU has bf16 units
(`trainer.precision=auto`: `fast_bf16()`); fp32 where it has not.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

SIZE = 2048


def matmul_gflops(dtype: torch.dtype, n: int | None = None, seconds_budget: float = 1.0, min_repeats: int = 2,
                  max_repeats: int = 50, device: str | torch.device = "cpu") -> float:
    """Best achieved GFLOP/s of an n x n @ n x n matmul in `dtype` (2 n^3 FLOPs per product; n: SIZE).

    One warm-up product is not timed; timed products repeat while the budget (warm-up included)
    lasts, at least `min_repeats` and at most `max_repeats` of them.
    """
    device = torch.device(device)
    n = n or probe_size(dtype, seconds_budget, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults of `out`
    sync()
    best = float("inf")
    done = 0
    while done < min_repeats or (done < max_repeats and time.perf_counter() - start < seconds_budget):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return 2 * n**3 / best / 1e9


def probe_size(dtype: torch.dtype, seconds_budget: float, device: torch.device, start: int = 256) -> int:
    """SIZE, or a smaller power of two where one SIZE product would take more than a quarter of the budget.

    A CPU without bf16 units (AVX2 only) multiplies bf16 matrices ~150x slower than fp32: one 2048^2
    product takes ~17 s there, so the probe first times a `start`^2 product and scales n down to fit.
    """
    a = torch.ones(start, start, device=device, dtype=dtype)
    torch.matmul(a, a)  # kernel selection
    t0 = time.perf_counter()
    torch.matmul(a, a)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per = max(time.perf_counter() - t0, 1e-9)
    n = start
    while n < SIZE and per * (2 * n / start) ** 3 <= seconds_budget / 4:
        n *= 2
    return n


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products are native here: CUDA with bf16, or a CPU with AMX or AVX512-BF16 units.

    Where they are not, autocast to bf16 makes training slower, not faster (measured on an AVX2-only AMD
    EPYC: bf16 matmul 1 GFLOP/s against 147 in fp32), so `trainer.precision=auto` picks 32-true there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(c is not None for c in checks):
        return any(c() for c in checks)
    # a torch without the capability queries: measure (bf16 at least as fast as fp32 on a small product)
    return matmul_gflops(torch.bfloat16, 256, 0.05) >= matmul_gflops(torch.float32, 256, 0.05)


def bf16_matmul_gflops(seconds_budget: float = 2.0, n: int | None = None) -> float:
    """Achieved GFLOP/s of square bf16 matmuls (best repeat): this machine's practical bf16 peak."""
    return matmul_gflops(torch.bfloat16, n, seconds_budget)


def fp32_matmul_gflops(seconds_budget: float = 1.0, n: int | None = None) -> float:
    """Achieved GFLOP/s of square fp32 matmuls (best repeat), for reference."""
    return matmul_gflops(torch.float32, n, seconds_budget)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_note(seconds_budget: float = 2.5, n: int | None = None) -> dict:
    """The machine a measurement ran on and its speed right now (about `seconds_budget` seconds).

    {"bf16_matmul_gflops", "fp32_matmul_gflops", "cpu_model", "cpus", "threads", "torch", "probe"}.
    The budget is split 60/40 between the bf16 and the fp32 probe.
    """
    return {
        "bf16_matmul_gflops": round(bf16_matmul_gflops(0.6 * seconds_budget, n), 1),
        "fp32_matmul_gflops": round(fp32_matmul_gflops(0.4 * seconds_budget, n), 1),
        "cpu_model": cpu_model(),
        "cpus": cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "probe": f"{n}^2 matmul, best repeat" if n else f"square matmul (n <= {SIZE}, fitted to the budget), best repeat",
        "fast_bf16": fast_bf16(),
    }


if __name__ == "__main__":
    t0 = time.perf_counter()
    note = machine_note()
    print(json.dumps(note, indent=1))
    print(f"({time.perf_counter() - t0:.1f} s)")
