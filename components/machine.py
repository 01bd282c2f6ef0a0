"""What a run's timings were measured on: processor, cores, memory and GPU, in one line.

Time budgets make step counts, throughput and so results depend on the machine; the report's
provenance block and ``latentlab runs`` read this from the ``latentlab.machine`` tag.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX and AVX-512; ``bf16`` is ARM's (Features)
NO_BF16 = "no bf16"  # in a processor_id, where it has none of them


def processor_id() -> str:
    """This CPU as ``"<model name> [<bf16 flags>]"``, e.g. ``"AMD EPYC [avx512_bf16]"``: the
    model name and bf16 flags of /proc/cpuinfo, else ``platform`` (no flags known)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    found = set(flags.group(1).split()) if flags else set()
    model = name.group(1).strip() if name else platform.processor() or platform.machine() or "unknown"
    return f"{model} [{' '.join(f for f in BF16_FLAGS if f in found) or NO_BF16}]"


def describe() -> str:
    """E.g. ``"AMD EPYC [avx512_bf16], 2 cores, 24 GiB, no GPU"``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    parts = [processor_id(), f"{cores} cores"]
    if memory:
        parts.append(f"{memory:.0f} GiB")
    parts.append(", ".join(gpus) if gpus else "no GPU")
    return ", ".join(parts)
