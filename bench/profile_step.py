"""Where one optimizer step's time goes: torch.profiler over ``Fit.step``, summarised for a terminal."""

from __future__ import annotations

import time

import torch


def profile(fit, label: str) -> dict:
    """Profile one step of ``fit``; prints GPU-busy vs wall time and the top operators by CPU and GPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start = time.perf_counter()
        fit.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy = sum(e.self_device_time_total for e in kernels) / 1e6
    launches = sum(e.count for e in kernels)
    print(f"PROFILE {label}: wall {wall:.3f}s, GPU kernels {gpu_busy:.3f}s ({launches} launches)", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48), flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60), flush=True)
    # which operator and shape each stretch of GPU time comes from (copies, casts, the LoRA products)
    shaped = prof.key_averages(group_by_input_shape=True)
    print(
        shaped.table(sort_by="device_time_total", row_limit=45, max_name_column_width=40, max_shapes_column_width=70),
        flush=True,
    )
    return {"profile_wall_s": round(wall, 3), "profile_gpu_s": round(gpu_busy, 3), "profile_launches": launches}
