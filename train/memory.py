"""Peak memory of a stretch of training: the CUDA allocator's peak, or on CPU the kernel's peak resident set.

The process's lifetime peak (ru_maxrss) includes Python, torch and the loaded model, which on a tiny model hides
the difference between two training setups; `Memory.mark()` resets the peak to "now" so that `peak() - base` is
what the training itself added (gradients, optimizer state, activations).
"""

from __future__ import annotations

import gc
import re
from pathlib import Path


class Memory:
    """Peak memory since `mark()`: CUDA allocator peak, or on CPU the kernel's peak RSS (VmHWM) after a reset."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.start = self.current()

    @staticmethod
    def _status(key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(m.group(1)) * 1024

    def current(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return self._status("VmRSS")

    def mark(self) -> None:
        import torch

        gc.collect()
        self.base = self.current()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:  # not Linux, or not allowed: the peak stays the lifetime peak
                pass

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")
