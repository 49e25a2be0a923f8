"""The train app under FSDP2 on CPU processes (gloo), for the tests:

    ACCELERATE_USE_CPU=true accelerate launch --config_file FSDP.yaml tests/fsdp_on_cpu.py [train args ...]

FSDP2 itself shards, gathers and reduces on CPU tensors over gloo, but accelerate turns its FSDP plugin on only
for GPU-like process groups (a CPU group stays MULTI_CPU and the plugin is dropped). This launcher lets
accelerate's own FSDP2 path (fsdp2_prepare_model, its mixed-precision policy, the optimizer's parameter swap)
run on the CPU ranks it was given, then runs the train app unchanged. Tests only: a user's FSDP run is on GPUs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # every later state reads it
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    if sys.argv[1:2] == ["--step-gradients"]:  # the gradient-equivalence helper instead of the train app
        import runpy

        sys.argv = [str(Path(__file__).with_name("step_gradients.py")), *sys.argv[2:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        from train.__main__ import main

        sys.exit(main(sys.argv[1:]))
