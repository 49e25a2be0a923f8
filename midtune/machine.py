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
    """A TCP port nobody listens on now, for the rendezvous of a multi-process launch. Each `accelerate launch` that
    midtune's checks and tests start takes its own, so launches side by side (pytest -n, the GPU check's backends)
    never meet on the default 29500.

    Drawn below the kernel's ephemeral range (ip_local_port_range), never from it: a port the kernel hands out may
    be the source port of some connection, and a rank that dials such a port before its store listens can connect
    to itself (TCP self-connect) and wait out the whole rendezvous timeout. That is how letting the kernel pick
    (bind to port 0) failed here: two DeepSpeed launches of the GPU check timed out while connecting."""
    import random
    import socket

    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port found in 20000-{low - 1}")
