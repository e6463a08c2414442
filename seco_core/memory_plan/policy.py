"""plan_job: the memory mode, window length and chunk one job trains with on one device.

The policy over the plan's arithmetic (search.py): memory-saving modes are tried in order
of speed (MEMORY_MODES) at the job's max_length, and the first that fits wins; a job that
left max_length unset and does not fit even in the most frugal mode takes the longest
length that mode fits. Torch-free: the caller (worker/trainer.py) states what the device
is (its kind, the compute dtype's width, whether fused attention kernels run, the device
and host budgets) and gets a JobPlan, or PlanRefused whose message says what would fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from seco_core.job_config import JobConfig
from seco_core.memory_plan.estimate import PlanOptions
from seco_core.memory_plan.search import FASTEST_CHUNK, MemoryPlan, plan

MEMORY_MODES: tuple[dict[str, bool], ...] = (
    {"layer_checkpointing": False, "kv_offload": False},
    {"layer_checkpointing": True, "kv_offload": False},
    {"layer_checkpointing": True, "kv_offload": True},
)
"""Configurations in order of speed: each later one saves memory at some cost in time."""

DEFAULT_LENGTH = 4096
"""The window length planned for when neither the job, the data nor the model's config say one."""


@dataclass(frozen=True)
class JobPlan:
    """What the memory plan decided for a job on a device."""

    max_length: int
    chunk_size: int
    offload_kv: bool
    layer_checkpointing: bool
    memory: MemoryPlan


class PlanRefused(ValueError):
    """No memory mode fits the job; the message (the most frugal mode's plan) says what would."""

    def __init__(self, memory: MemoryPlan) -> None:
        super().__init__(memory.message)
        self.memory = memory


def plan_job(
    model_config: Any,
    job: JobConfig,
    *,
    device_kind: str,
    dtype_bytes: int,
    fused_attention: bool,
    budget_bytes: int,
    host_budget_bytes: int | None,
    length: int | None = None,
    branch_tokens: int = 0,
) -> JobPlan:
    """The fastest memory mode that fits `job` on the device, or PlanRefused.

    `length`: the longest sequence of the job's data, planned for when the job leaves
    max_length unset (capped by the model's context, `max_position_embeddings`).
    `host_budget_bytes` None means there is no host to offload to (a CPU device: offloading
    from the CPU to the CPU saves nothing), so KV offload is not tried. The options describe
    what will run: the device kind's fastest chunk size, fused attention kernels where the
    device and dtype have them, 4-bit weights for NF4 jobs, and a DPO step's second answer
    (`branch_tokens`, PlanOptions.branch_tokens).
    """
    context = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    lora = job.lora
    targets = tuple(lora.target_modules) if lora.target_modules else PlanOptions().lora_targets
    default = min(length, context) if length and context else length or context or DEFAULT_LENGTH
    requested = job.max_length or default
    base = PlanOptions(
        dtype_bytes=dtype_bytes,
        lora_r=lora.r,
        lora_targets=targets,
        fused_attention=fused_attention,
        max_chunk=FASTEST_CHUNK.get(device_kind),
        weights_4bit=job.load_in_4bit,
        branch_tokens=branch_tokens,
    )
    memory: MemoryPlan | None = None
    for mode in MEMORY_MODES:
        if mode["kv_offload"] and host_budget_bytes is None:
            continue
        options = dataclasses.replace(
            base, layer_checkpointing=mode["layer_checkpointing"], kv_offload=mode["kv_offload"]
        )
        memory = plan(model_config, requested, budget_bytes, job.chunk_size, options, host_budget_bytes)
        last = mode is MEMORY_MODES[-1]
        if not memory.fits and job.max_length is None and memory.longest_length >= 2 and last:
            memory = plan(model_config, memory.longest_length, budget_bytes, job.chunk_size, options, host_budget_bytes)
        if memory.fits and memory.chunk_size is not None:
            return JobPlan(
                max_length=memory.seq_len,
                chunk_size=min(memory.chunk_size, memory.seq_len),
                offload_kv=mode["kv_offload"],
                layer_checkpointing=mode["layer_checkpointing"],
                memory=memory,
            )
    assert memory is not None
    raise PlanRefused(memory)
