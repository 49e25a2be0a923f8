"""midtune analysis app: per-layer geometry of visual vs textual representations, and which layers to train.

    python -m analysis profile --model base=runs/demo/stage_b/final --model middle=runs/demo/stage_c_middle/final \\
        --pairs runs/world/pairs.jsonl --out runs/analysis/profile [--k 30] [--label dominant_color]
    python -m analysis intervene --model runs/demo/stage_c_middle/final --tasks color,count --out runs/analysis/knockout
    python -m analysis suggest-layers --model runs/demo/stage_b/final --pairs runs/world/pairs.jsonl --out layers.yaml

Errors in the input (missing files or images, too few pairs for k, unknown tasks, bad models) are one line on
stderr and exit code 2, found before any model is loaded where possible.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from analysis.extract import AnalysisError
from midtune.checkpoint import ATTN_IMPLEMENTATIONS

log = logging.getLogger("midtune.analysis")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model for a delta or a checkpoint's trainable.safetensors (default: the "
                                  "delta's metadata)")
    p.add_argument("--lora-scale", type=float, help="LoRA alpha / r, for checkpoint tensors holding LoRA adapters")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--attn-implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel the model runs (default sdpa; flash_attention_2 needs flash-attn)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_profile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", help="pairs JSONL: {id, image, caption, labels}")
    p.add_argument("--image-folder", help="folder the pairs' images are relative to (default: <pairs dir>/images)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths (absolute, or with ..) that lead outside the image folder")
    p.add_argument("--k", type=int, default=30, help="neighbours for the overlaps (default 30; needs k + 2 pairs)")
    p.add_argument("--label", default="dominant_color", help="label of the probe and label overlap")
    p.add_argument("--max-pairs", type=int, help="use only the first N pairs")
    p.add_argument("--prompt", default=None, help='text after the image (default "Describe the image.")')
    p.add_argument("--caption-format", default="plain", choices=("plain", "chat"),
                   help="caption pass: plain text (default) or a chat-template user turn")
    p.add_argument("--gride-rank", type=int, default=8, help="GRIDE scale n (μ = r_2n / r_n), default 8")
    p.add_argument("--idcorr-shuffles", type=int, default=3, help="shuffles for the IdCorr p-value (default 3)")
    p.add_argument("--no-idcorr", action="store_true", help="skip IdCorr (it runs its own neighbour searches)")
    p.add_argument("--shard-size", type=int, default=256, help="pairs per extraction shard file")
    p.add_argument("--seed", type=int, default=0, help="probe split and IdCorr shuffles")
    _add_model_options(p)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="per-layer geometry of one or more models (JSON, CSV, PNG)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="model directory, hub id, delta or checkpoint (repeat for several models)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)  # the training hook runs at lower priority
    _add_profile_options(p)

    p = sub.add_parser("intervene", help="image → text attention knockout per window of LLM layers")
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--tasks", default="color,shape,count,position,exists",
                   help="comma-separated question types of the world's test/ (default: all five)")
    p.add_argument("--world", help="shapes world directory (default: the canonical world of the eval tasks, "
                                   "generated if missing)")
    p.add_argument("--window", type=int, help="layers per window (default: round(num_layers / 4))")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--limit", type=int, help="first N questions per task")
    p.add_argument("--out", required=True, help="output directory")
    _add_model_options(p)

    p = sub.add_parser("suggest-layers", help="which block of LLM layers to train, from a profile")
    p.add_argument("--model", metavar="PATH", help="model to profile (with --pairs), or the model's name in --profile")
    p.add_argument("--profile", help="an existing profiles.json (or its directory) instead of computing one")
    p.add_argument("--fraction", type=float, default=0.5, help="block size as a fraction of the LLM layers")
    p.add_argument("--rule", default="id_valley", choices=("id_valley", "overlap_peak"))
    p.add_argument("--out", help="write the YAML snippet here (it is printed either way)")
    p.add_argument("--work-dir", help="keep the computed profile here (default: a temporary directory)")
    _add_profile_options(p)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from midtune.adapters import UnsupportedModelError
    from midtune.checkpoint import CheckpointError
    from midtune.spec import SpecError

    try:
        if args.command == "profile":
            run_profile(args)
        elif args.command == "intervene":
            run_intervene(args)
        else:
            run_suggest(args)
    except (AnalysisError, CheckpointError, UnsupportedModelError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------------


def _device(value: str) -> str | None:
    from eval.sources import resolve_device

    try:
        return resolve_device(None if value == "auto" else value)
    except ValueError as e:
        raise AnalysisError(str(e)) from None


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def profile_models(args, models: list[str], out: Path) -> tuple[dict, dict]:
    """Extract and profile each `NAME=PATH` into `out`; returns (profiles, info) as written by write_profiles."""
    from analysis.extract import DEFAULT_PROMPT, ExtractSettings, extract, parse_model_arg, read_pairs, \
        resolve_model
    from analysis.profile import ProfileSettings, compute_profile, write_profiles

    if not args.pairs:
        raise AnalysisError("--pairs is required")
    _check_positive(batch_size=args.batch_size, max_pairs=args.max_pairs, shard_size=args.shard_size)
    settings = ProfileSettings(k=args.k, label=args.label, gride_rank=args.gride_rank,
                               idcorr_shuffles=args.idcorr_shuffles, idcorr=not args.no_idcorr, seed=args.seed)
    settings.check()
    extract_settings = ExtractSettings(prompt=args.prompt or DEFAULT_PROMPT, caption_format=args.caption_format,
                                       batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                                       attn_implementation=args.attn_implementation)
    extract_settings.check()
    # Everything that can be checked without a model is checked first.
    pairs = read_pairs(args.pairs, args.image_folder, label=args.label, max_pairs=args.max_pairs,
                       allow_outside_images=args.allow_outside_images)
    settings.check(len(pairs))
    named = [parse_model_arg(m) for m in models]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise AnalysisError(f"two --model arguments share the name {next(n for n in names if names.count(n) > 1)!r}; "
                            f"name them NAME=PATH")
    refs = {name: resolve_model(path, args.base, args.lora_scale) for name, path in named}
    device = _device(args.device)
    labels = [p.labels[args.label] for p in pairs]

    profiles, info = {}, {}
    for name, ref in refs.items():
        extraction = extract(ref, pairs, out / "extract" / name, extract_settings, device=device,
                             progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
        profiles[name] = compute_profile(extraction, labels, settings, name=name, progress=not args.no_progress)
        info[name] = {"source": ref.describe(), "family": extraction.index["family"],
                      "num_layers": extraction.num_layers, "hidden_size": extraction.hidden_size,
                      "extraction": str(extraction.path)}
    paths = write_profiles(out, profiles, info, settings,
                           extra={"pairs": str(Path(args.pairs).resolve()), "n_pairs": len(pairs),
                                  "prompt": extract_settings.prompt, "caption_format": args.caption_format})
    log.info(f"profile of {', '.join(refs)}: {paths['png']} ({paths['json'].name}, {paths['csv'].name})")
    return profiles, info


def run_profile(args) -> None:
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    profile_models(args, args.model, Path(args.out))


def run_intervene(args) -> None:
    import json

    from analysis.extract import load_model, resolve_model
    from analysis.intervene import read_questions, run_intervention
    from analysis.plots import plot_intervention

    _check_positive(batch_size=args.batch_size, limit=args.limit, window=args.window, stride=args.stride)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise AnalysisError("--tasks is empty")
    if args.world:
        world = Path(args.world)
        if not world.is_dir():
            raise AnalysisError(f"world {str(world)!r} does not exist")
    else:
        from eval.tasks import ensure_shapes_data

        world = Path(ensure_shapes_data(progress=not args.no_progress))
    questions = read_questions(world, tasks, args.limit)
    ref = resolve_model(args.model, args.base, args.lora_scale)
    model, processor = load_model(ref, args.dtype, _device(args.device), args.trust_remote_code,
                                  args.attn_implementation)
    result = run_intervention(model, processor, questions, window=args.window, stride=args.stride,
                              batch_size=args.batch_size, progress=not args.no_progress)
    result = {"model": ref.describe(), "world": str(world.resolve()), **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "intervention.json").write_text(json.dumps(result, indent=1))
    plot_intervention(result, out / "intervention.png")
    base, full = result["baseline"]["accuracy"]["mean"], result["all_layers"]["accuracy"]["mean"]
    worst = min(result["windows"], key=lambda w: w["accuracy"]["mean"])
    log.info(f"baseline accuracy {base:.3f}; all layers blocked {full:.3f}; lowest window {worst['start']}-"
             f"{worst['end'] - 1} ({worst['accuracy']['mean']:.3f}) → {out / 'intervention.json'}, "
             f"{out / 'intervention.png'}")


def run_suggest(args) -> None:
    from analysis.profile import read_profiles
    from analysis.suggest import suggest_block

    if args.profile:
        doc = read_profiles(args.profile)
        names = list(doc["profiles"])
        name = args.model or (names[0] if len(names) == 1 else None)
        if name not in doc["profiles"]:
            raise AnalysisError(f"{args.profile}: pick one of its models with --model ({', '.join(names)})")
        profile, num_layers, source = doc["profiles"][name], doc["models"][name]["num_layers"], \
            doc["models"][name]["source"]
        pairs = doc["settings"].get("pairs")
    else:
        if not args.model or not args.pairs:
            raise AnalysisError("suggest-layers needs --model and --pairs (or --profile)")
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="midtune-suggest-"))
        try:
            profiles, info = profile_models(args, [args.model], work)
        finally:
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
        name = next(iter(profiles))
        profile, num_layers, source = profiles[name], info[name]["num_layers"], info[name]["source"]
        pairs = args.pairs
    suggestion = suggest_block(profile, num_layers, args.fraction, args.rule)
    text = suggestion.yaml([f"suggested by `python -m analysis suggest-layers` for {source} "
                            f"({num_layers} LLM layers), pairs {pairs}"])
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log.info(f"→ {out}")


if __name__ == "__main__":
    sys.exit(main())
