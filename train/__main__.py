"""midtune training app: layer-restricted visual instruction tuning.

    accelerate launch train --config configs/demo/stage_c_middle.yaml [key=value ...]
    python -m train --config ... [key=value ...]          # one process

The recipe itself is train/recipe.py (setup → train → save). This module is the command line: it reads the config
and turns what stopped a run into one message and an exit code.

Nothing is written to `output_dir` until every input has been checked. Exit codes: 0 done; 2 bad input (config,
layer spec, data, model or checkpoint; one message naming the file, row or key); 1 a checkpoint or the final
model could not be written (a full disk); 3 a non-finite loss; 128 + N stopped by signal N (SIGTERM: 143,
SIGINT: 130) after finishing the step and saving a checkpoint. Whenever a checkpoint exists the command that
resumes the run is printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from midtune.adapters import UnsupportedModelError
from midtune.checkpoint import CheckpointError
from midtune.data import DataError
from midtune.spec import SpecError
from train.checkpoints import CheckpointSaveError, checkpoint_dirs
from train.config import ConfigError, load_config
from train.recipe import train
from train.stopping import Interrupted, NonFiniteLoss, TrainingStopped, UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train", description="Layer-restricted visual instruction tuning.")
    ap.add_argument("--config", help="YAML run config (configs/...)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainable.layers=8-23")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        train(config)
    except (ConfigError, SpecError, DataError, CheckpointError, UnsupportedModelError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointSaveError) as e:
        print(e if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
        if checkpoint_dirs(Path(config.output_dir)):
            # the hint must run under the backend in use: DeepSpeed refuses on_nan_loss=skip
            skip = isinstance(e, NonFiniteLoss) and e.skip_available and config.on_nan_loss == "error"
            extra = ["on_nan_loss=skip"] if skip else []
            print(f"resume with:\n  {resume_command(args.config, args.overrides, extra)}", file=sys.stderr)
        return getattr(e, "code", 1)
    return 0


def resume_command(config_path: str | None, overrides: list[str], extra: list[str] = ()) -> str:
    """The command that continues this run from its newest complete checkpoint (run from this directory)."""
    replaced = {"resume_from", *(o.partition("=")[0] for o in extra)}
    args = ["--config", config_path] if config_path else []
    args += [o for o in overrides if o.partition("=")[0].strip() not in replaced] + ["resume_from=latest", *extra]
    # Under a launcher (accelerate launch, torchrun) this process cannot see the launcher's own options.
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    program = "accelerate launch <this run's launch options> train" if launched else "python -m train"
    return f"cd {shlex.quote(os.getcwd())} && {program} {shlex.join(args)}"


if __name__ == "__main__":
    sys.exit(main())
