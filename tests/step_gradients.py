"""One optimizer step of a training config, its gradients written to a file: what the gradient-equivalence tests
compare across splits of one global batch (one micro-batch, accumulation, ranks).

    [accelerate launch ...] python tests/step_gradients.py OUT.safetensors key=value ...
    accelerate launch --config_file FSDP.yaml tests/fsdp_on_cpu.py --step-gradients OUT.safetensors key=value ...

The recipe is built exactly as `train` builds it (setup_accelerator → setup_model → setup_data →
setup_optimizer) and takes its first step through `Recipe.take_step`; the gradients are read just before the
optimizer clears them, after the backend has reduced them over ranks. Rank 0 writes OUT with the step's logged
loss and every rank's sample ids beside it (OUT.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(out: str, overrides: list[str]) -> None:
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from midtune.adapters import unwrap
    from train.config import load_config
    from train.recipe import Recipe

    recipe = Recipe(load_config(None, overrides))
    recipe.setup_accelerator()
    recipe.setup_model()
    recipe.setup_data()
    recipe.setup_optimizer()
    recipe.start_loop()
    grads: dict = {}
    zero_grad = recipe.optimizer.zero_grad

    def capture_then_zero(*args, **kwargs):
        for name, p in unwrap(recipe.accelerator.unwrap_model(recipe.model)).named_parameters():
            if p.requires_grad:
                grad = p.grad.detach() if p.grad is not None else None
                if grad is not None and hasattr(grad, "full_tensor"):  # an FSDP2 shard: the whole gradient
                    grad = grad.full_tensor()
                grads[name] = grad.clone() if grad is not None else None
        return zero_grad(*args, **kwargs)

    recipe.optimizer.zero_grad = capture_then_zero
    update = recipe.take_step(recipe.micro_batches())
    samples = gather_object([i for ids, _ in recipe.window for i in ids])
    if recipe.main_process:
        import torch

        save_file({k: (v if v is not None else torch.zeros(0)).contiguous() for k, v in grads.items()}, out)
        Path(out + ".json").write_text(json.dumps({"loss": update.loss, "samples": sorted(samples),
                                                   "no_grad": sorted(k for k, v in grads.items() if v is None),
                                                   "distributed_type": recipe.accelerator.distributed_type.name}))
    recipe.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
