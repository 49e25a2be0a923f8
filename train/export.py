"""Merge a delta into its base model: a standard Hugging Face directory that vanilla transformers loads.

    python -m train.export --base BASE --delta RUN/final/delta.safetensors --out MERGED

The delta's metadata names the base and a hash of its weights; a base with other weights is refused.
LoRA deltas are merged through PEFT (`merge_and_unload`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from midtune.checkpoint import CheckpointError, load_with_delta, save_merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model directory or hub id the delta was trained on")
    ap.add_argument("--delta", required=True, help="delta.safetensors from a run's final/ directory")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-verify-base", action="store_true", help="skip the base hash check (not recommended)")
    ap.add_argument("--trust-remote-code", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise CheckpointError(f"--out {str(out)!r} exists and is not empty (use --overwrite)")
        model, processor = load_with_delta(args.base, args.delta, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code,
                                           verify_base=not args.no_verify_base)
        save_merged(model, processor, out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.delta} into {args.base} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
