"""How much memory a step may use: the device's (or the host's) free memory now, less a reserve."""

from __future__ import annotations

from seco_core.memory_plan.sizes import GiB


def device_budget_bytes(device: str, reserve_bytes: int | None = None) -> int:
    """Bytes a training step may use on `device`.

    CUDA: the device's free memory now (other processes on the GPU count), capped by the
    per-process memory fraction if one was set, minus a reserve (default 1 GiB) for what
    the caching allocator never sees: the CUDA context's growth as kernels and libraries
    load (cuBLAS, FlashAttention); the allocator's own overhead is a term of the plan.
    CPU: RAM available now (psutil) minus a reserve (default 10% of total RAM, at least
    1 GiB), so the OS and other processes keep room. Call it before loading the model:
    its weights are in the plan.
    """
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        allowed = int(total * torch.cuda.get_per_process_memory_fraction(index)) - torch.cuda.memory_reserved(index)
        reserve = GiB if reserve_bytes is None else reserve_bytes
        return max(0, min(int(free), allowed) - reserve)
    import psutil

    vm = psutil.virtual_memory()
    reserve = max(GiB, vm.total // 10) if reserve_bytes is None else reserve_bytes
    return max(0, int(vm.available) - reserve)
