"""What a benchmark records about the machine it ran on (analysis.bench, train.bench), and a free port for a
launch of several processes."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info(**extra) -> dict:
    """CPU model, cores, GPU, load average at start, python and torch versions, plus the caller's `extra` fields
    (thread count, device, versions of the libraries it measures)."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **extra,
    }


def free_port() -> int:
    """A TCP port nobody listens on now. Each multi-process `accelerate launch` that midtune's checks and tests start
    takes its own, so launches side by side (pytest -n, the GPU check's backends) never meet on the default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
