"""midtune analysis app: per-layer geometry of visual vs textual representations, and which layers to train.

    python -m analysis profile --model base=runs/demo/align/final --model middle=runs/demo/middle/final \\
        --pairs runs/world/pairs.jsonl --out runs/analysis/profile [--k 30] [--label dominant_color] \\
        [--protocol authors|describe] [--position last|mean|token]
    python -m analysis intervene --model runs/demo/middle/final --tasks color,count \
        --out runs/analysis/knockout [--target image|last-image|after-image|last]
    python -m analysis logit-lens --model base=runs/demo/align/final --model full=runs/demo/full/final \
        --pairs runs/world/pairs.jsonl --out runs/analysis/lens
    python -m analysis heads --model runs/demo/middle/final --concept color --out runs/analysis/heads \
        [--edit suppress --top 0.01]
    python -m analysis suggest-layers --model runs/demo/align/final --pairs runs/world/pairs.jsonl --out layers.yaml

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

from analysis.extract import POSITIONS, PROTOCOLS, AnalysisError
from analysis.heads import EDITS
from analysis.intervene import TARGETS
from midtune.checkpoint import ATTN_IMPLEMENTATIONS
from midtune.files import write_json, write_text

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
    p.add_argument("--protocol", default="authors", choices=PROTOCOLS,
                   help="authors (default): the image with its question beside a textual twin (its captions and the "
                        "same question), read at one position; describe: the image with a fixed prompt beside the "
                        "caption alone (docs/analysis.md compares them)")
    p.add_argument("--position", default="last", choices=POSITIONS,
                   help="authors: where image and twin are read: the last token (default), the sequence mean, or "
                        "one drawn image / caption token")
    p.add_argument("--token-seed", type=int, default=0, help="authors: which token is each pair's drawn token")
    p.add_argument("--prompt", default=None, help='describe: text after the image (default "Describe the image.")')
    p.add_argument("--caption-format", default="plain", choices=("plain", "chat"),
                   help="describe: caption pass as plain text (default) or a chat-template user turn")
    p.add_argument("--gride-rank", type=int, default=None,
                   help="GRIDE scale n1 (μ = r_2n1 / r_n1): default 16 under the authors' protocol (theirs), 8 "
                        "under describe")
    p.add_argument("--gride-range-max", type=int, default=100,
                   help="the whole GRIDE curve for the scale plot (gride_scaling.png): n1 = 1, 2, 4, … with "
                        "2·n1 ≤ this (default 100, the authors'; 0: off)")
    p.add_argument("--idcorr-shuffles", type=int, default=3, help="shuffles for the IdCorr p-value (default 3)")
    p.add_argument("--no-idcorr", action="store_true", help="skip IdCorr (it runs its own neighbour searches)")
    p.add_argument("--shard-size", type=int, default=256, help="pairs per extraction shard file")
    p.add_argument("--band-resamples", type=int, default=200,
                   help="resamples of the pairs for each ID and overlap curve's 95 %% band (default 200; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="probe split, IdCorr shuffles and the bands' resamples")
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

    p = sub.add_parser("intervene", help="attention knockout (the image or one token) per window of LLM layers")
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--tasks", default="color,shape,count,position,exists",
                   help="comma-separated question types of the world's test/ (default: all five)")
    p.add_argument("--world", help="shapes world directory (default: the canonical world, generated if "
                                   "missing in $MIDTUNE_CACHE/shapes-canonical, default ~/.cache/midtune)")
    p.add_argument("--window", type=int, help="layers per window (default: round(num_layers / 4))")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--target", default="image", choices=TARGETS,
                   help="what later positions may not attend to: the image tokens (default), the last image token, "
                        "the token right after the image, or the prompt's last token (the answer's tokens lose it)")
    p.add_argument("--limit", type=int, help="first N questions per task")
    p.add_argument("--out", required=True, help="output directory")
    _add_model_options(p)

    p = sub.add_parser("logit-lens", help="decode each layer's image-token states: where the depicted words appear")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="model directory, hub id, delta or checkpoint (repeat for several models)")
    p.add_argument("--pairs", required=True, help="pairs JSONL: {id, image, caption, labels}")
    p.add_argument("--image-folder", help="folder the pairs' images are relative to (default: <pairs dir>/images)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths (absolute, or with ..) that lead outside the image folder")
    p.add_argument("--labels", default="dominant_color,dominant_shape",
                   help="comma-separated labels of the pairs whose values are the words looked for "
                        "(default dominant_color,dominant_shape)")
    p.add_argument("--top-k", type=int, default=10, help="k of 'in the top k' and of the decoded examples")
    p.add_argument("--examples", type=int, default=3, help="pairs whose top-k decoded tokens per layer are kept")
    p.add_argument("--max-pairs", type=int, help="use only the first N pairs")
    p.add_argument("--prompt", default=None, help='text after the image (default "Describe the image.")')
    p.add_argument("--out", required=True, help="output directory")
    _add_model_options(p)

    p = sub.add_parser("heads", help="rank attention heads by how much they write a concept; edit the top ones")
    p.add_argument("--model", required=True, metavar="PATH", help="model directory, hub id, delta or checkpoint")
    p.add_argument("--concept", required=True,
                   help="a label of the pairs (color, shape, ...: every label named so or ending in _<concept>)")
    p.add_argument("--words", help="comma-separated words of the concept (default: the pairs' values of it)")
    p.add_argument("--world", help="shapes world directory: its pairs.jsonl and test questions (default: the "
                                   "canonical world in $MIDTUNE_CACHE/shapes-canonical, generated if missing)")
    p.add_argument("--pairs", help="pairs JSONL whose image + caption sequences are the samples (default: the "
                                   "world's pairs.jsonl)")
    p.add_argument("--image-folder", help="folder the pairs' images are relative to (default: <pairs dir>/images)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths (absolute, or with ..) that lead outside the image folder")
    p.add_argument("--max-pairs", type=int, default=64, help="pairs used as samples (default 64)")
    p.add_argument("--atoms", type=int, default=10, help="matching-pursuit steps (tokens) per head (default 10)")
    p.add_argument("--prompt", default=None, help='text after the image (default "Describe the image.")')
    p.add_argument("--edit", choices=sorted(EDITS), help="scale the top heads' outputs and score the world's tasks "
                                                         "with and without the edit")
    p.add_argument("--top", type=float, default=0.01, help="fraction of all heads edited (default 0.01, at least 1)")
    p.add_argument("--scale", type=float, help="output scale of edited heads (default 0 for suppress, 2 for enhance)")
    p.add_argument("--tasks", default="color,shape", help="question types scored for the edit (default color,shape)")
    p.add_argument("--limit", type=int, default=100, help="first N questions per task (default 100)")
    p.add_argument("--seed", type=int, default=0, help="draw of the random heads of the control")
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
        elif args.command == "logit-lens":
            run_logit_lens(args)
        elif args.command == "heads":
            run_heads(args)
        else:
            run_suggest(args)
    except (AnalysisError, CheckpointError, UnsupportedModelError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------------


def _device(value: str) -> str | None:
    from midtune.sources import resolve_device

    try:
        return resolve_device(None if value == "auto" else value)
    except ValueError as e:
        raise AnalysisError(str(e)) from None


def comma_list(value: str) -> list[str]:
    """`a, b,,c` → ["a", "b", "c"]."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def profile_models(args, models: list[str], out: Path) -> tuple[dict, dict]:
    """Extract and profile each `NAME=PATH` into `out`; returns (profiles, info) as written by write_profiles."""
    from analysis.extract import DEFAULT_PROMPT, TWIN_INSTRUCTION, ExtractSettings, extract, read_pairs
    from analysis.profile import AUTHORS_GRIDE_RANK, ProfileSettings, compute_profile, write_profiles

    if not args.pairs:
        raise AnalysisError("--pairs is required")
    _check_positive(batch_size=args.batch_size, max_pairs=args.max_pairs, shard_size=args.shard_size)
    authors = args.protocol == "authors"
    gride_rank = args.gride_rank or (AUTHORS_GRIDE_RANK if authors else ProfileSettings.gride_rank)
    settings = ProfileSettings(k=args.k, label=args.label, gride_rank=gride_rank,
                               idcorr_shuffles=args.idcorr_shuffles, idcorr=not args.no_idcorr, seed=args.seed,
                               band_resamples=args.band_resamples, position=args.position,
                               gride_range_max=args.gride_range_max)
    settings.check()
    extract_settings = ExtractSettings(protocol=args.protocol, prompt=args.prompt or DEFAULT_PROMPT,
                                       caption_format=args.caption_format, batch_size=args.batch_size,
                                       shard_size=args.shard_size, dtype=args.dtype,
                                       attn_implementation=args.attn_implementation, token_seed=args.token_seed)
    extract_settings.check()
    # Everything that can be checked without a model is checked first.
    pairs = read_pairs(args.pairs, args.image_folder, label=args.label, max_pairs=args.max_pairs,
                       allow_outside_images=args.allow_outside_images, need_question=authors)
    settings.check(len(pairs))
    refs = _named_models(models, args)
    device = _device(args.device)
    labels = [p.labels[args.label] for p in pairs]

    profiles, info, terms, scaling = {}, {}, {}, {}
    for name, ref in refs.items():
        # One extraction directory per protocol: switching protocols does not throw the other's vectors away.
        where = out / "extract" / (name if args.protocol == "describe" else f"{name}-{args.protocol}")
        extraction = extract(ref, pairs, where, extract_settings, device=device,
                             progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
        terms[name], scaling[name] = {}, {}
        profiles[name] = compute_profile(extraction, labels, settings, name=name, progress=not args.no_progress,
                                         overlap_terms=terms[name], scaling=scaling[name])
        info[name] = {"source": ref.describe(), "family": extraction.index["family"],
                      "num_layers": extraction.num_layers, "hidden_size": extraction.hidden_size,
                      "extraction": str(extraction.path)}
    described = ({"position": args.position, "token_seed": args.token_seed, "twin": TWIN_INSTRUCTION} if authors
                 else {"prompt": extract_settings.prompt, "caption_format": args.caption_format})
    paths = write_profiles(out, profiles, info, settings, overlap_terms=terms, scaling=scaling,
                           extra={"pairs": str(Path(args.pairs).resolve()), "n_pairs": len(pairs),
                                  "ids": [p.id for p in pairs], "protocol": args.protocol, **described})
    log.info(f"profile of {', '.join(refs)}: {paths['png']} ({paths['json'].name}, {paths['csv'].name})")
    return profiles, info


def run_profile(args) -> None:
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    profile_models(args, args.model, Path(args.out))


def run_intervene(args) -> None:

    from analysis.extract import load_model, resolve_model
    from analysis.intervene import read_questions, run_intervention
    from analysis.plots import plot_intervention

    _check_positive(batch_size=args.batch_size, limit=args.limit, window=args.window, stride=args.stride)
    tasks = comma_list(args.tasks)
    if not tasks:
        raise AnalysisError("--tasks is empty")
    world = _world(args)
    questions = read_questions(world, tasks, args.limit)
    ref = resolve_model(args.model, args.base, args.lora_scale)
    model, processor = load_model(ref, args.dtype, _device(args.device), args.trust_remote_code,
                                  args.attn_implementation)
    result = run_intervention(model, processor, questions, window=args.window, stride=args.stride,
                              batch_size=args.batch_size, progress=not args.no_progress, target=args.target)
    result = {"model": ref.describe(), "world": str(world.resolve()), **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "intervention.json", result)
    plot_intervention(result, out / "intervention.png")
    base, full = result["baseline"]["accuracy"]["mean"], result["all_layers"]["accuracy"]["mean"]
    worst = min(result["windows"], key=lambda w: w["accuracy"]["mean"])
    log.info(f"{args.target} knockout: baseline accuracy {base:.3f}; all layers blocked {full:.3f}; "
             f"lowest window {worst['start']}-"
             f"{worst['end'] - 1} ({worst['accuracy']['mean']:.3f}) → {out / 'intervention.json'}, "
             f"{out / 'intervention.png'}")


def run_logit_lens(args) -> None:
    import gc

    import torch

    from analysis.extract import DEFAULT_PROMPT, load_model, load_tokenizer, read_pairs
    from analysis.lens import LensSettings, run_lens, summary_lines, word_tokens, write_lens

    _check_positive(batch_size=args.batch_size, max_pairs=args.max_pairs, top_k=args.top_k)
    labels = tuple(comma_list(args.labels))
    settings = LensSettings(labels=labels, top_k=args.top_k, examples=args.examples,
                            prompt=args.prompt or DEFAULT_PROMPT, batch_size=args.batch_size)
    settings.check()
    pairs = read_pairs(args.pairs, args.image_folder, label=labels, max_pairs=args.max_pairs,
                       allow_outside_images=args.allow_outside_images)
    refs = _named_models(args.model, args)
    device = _device(args.device)
    words = sorted({p.labels[label] for p in pairs for label in labels})
    for name, ref in refs.items():  # a word no tokenizer spells fails here, not after the first model's pass
        tokenizer = load_tokenizer(ref, args.trust_remote_code)
        if tokenizer is not None:
            word_tokens(tokenizer, words, f"--model {name}")
    result = {"pairs": str(Path(args.pairs).resolve()), "models": {}}
    for name, ref in refs.items():
        model, processor = load_model(ref, args.dtype, device, args.trust_remote_code, args.attn_implementation)
        result["models"][name] = {"source": ref.describe(), **run_lens(model, processor, pairs, settings,
                                                                        progress=not args.no_progress)}
        del model, processor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    paths = write_lens(Path(args.out), result, settings)
    for line in summary_lines(result, settings.top_k):
        log.info(line)
    log.info(f"logit lens of {', '.join(refs)}: {paths['png']} ({paths['json'].name}, {paths['csv'].name})")


def _world(args) -> Path:
    if args.world:
        world = Path(args.world)
        if not world.is_dir():
            raise AnalysisError(f"world {str(world)!r} does not exist")
        return world
    from midtune.shapes import default_world_dir, ensure_canonical_world

    return ensure_canonical_world(default_world_dir(), progress=not args.no_progress)


def run_heads(args) -> None:
    from analysis.extract import DEFAULT_PROMPT, load_model, load_tokenizer, read_pairs, resolve_model
    from analysis.heads import (
        HeadSettings,
        concept_words,
        rank_heads,
        score_edit,
        summary_lines,
        top_heads,
        write_heads,
    )
    from analysis.intervene import read_questions
    from analysis.lens import word_tokens

    _check_positive(batch_size=args.batch_size, max_pairs=args.max_pairs, atoms=args.atoms, limit=args.limit)
    if not 0 < args.top <= 1:
        raise AnalysisError(f"--top must be a fraction in (0, 1], got {args.top}")
    if args.scale is not None and not args.edit:
        raise AnalysisError("--scale applies to an edit: give --edit suppress or --edit enhance")
    tasks = comma_list(args.tasks)
    if args.edit and not tasks:
        raise AnalysisError("--tasks is empty")
    world = _world(args) if args.edit or not args.pairs else None
    pairs_file = Path(args.pairs) if args.pairs else world / "pairs.jsonl"
    pairs = read_pairs(pairs_file, args.image_folder, max_pairs=args.max_pairs,
                       allow_outside_images=args.allow_outside_images)
    words = tuple(comma_list(args.words)) if args.words else \
        concept_words(pairs, args.concept)
    questions = read_questions(world, tasks, args.limit) if args.edit else None
    settings = HeadSettings(concept=args.concept, words=words, atoms=args.atoms, batch_size=args.batch_size,
                            prompt=args.prompt or DEFAULT_PROMPT)
    settings.check()
    ref = resolve_model(args.model, args.base, args.lora_scale)
    tokenizer = load_tokenizer(ref, args.trust_remote_code)
    if tokenizer is not None:  # a word the tokenizer cannot spell fails before the model loads
        word_tokens(tokenizer, words, f"concept {args.concept!r}")
    model, processor = load_model(ref, args.dtype, _device(args.device), args.trust_remote_code,
                                  args.attn_implementation)
    result = {"model": ref.describe(), "pairs": str(pairs_file.resolve()),
              **rank_heads(model, processor, pairs, settings, progress=not args.no_progress)}
    if args.edit:
        scale = EDITS[args.edit] if args.scale is None else args.scale
        heads = top_heads(result, args.top)
        result["edit"] = {"edit": args.edit, "scale": scale, "top": args.top, "concept": args.concept,
                          "world": str(world.resolve()), "tasks": tasks,
                          "n_questions": {t: sum(q.task == t for q in questions) for t in tasks},
                          "scoring": "log-likelihood of each choice as the answer (argmin NLL); p(answer) = the "
                                     "right choice's share of exp(-NLL) over the choices",
                          "conditions": score_edit(model, processor, questions, heads, scale, seed=args.seed,
                                                   batch_size=args.batch_size, progress=not args.no_progress)}
    paths = write_heads(Path(args.out), result)
    for line in summary_lines(result):
        log.info(line)
    log.info(f"heads → {', '.join(str(p) for p in paths.values())}")


def _named_models(models: list[str], args) -> dict:
    """`NAME=PATH` arguments → {name: ModelRef}, names unique."""
    from analysis.extract import parse_model_arg, resolve_model

    named = [parse_model_arg(m) for m in models]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise AnalysisError(f"two --model arguments share the name {next(n for n in names if names.count(n) > 1)!r}; "
                            f"name them NAME=PATH")
    return {name: resolve_model(path, args.base, args.lora_scale) for name, path in named}


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
        write_text(out, text)
        log.info(f"→ {out}")


if __name__ == "__main__":
    sys.exit(main())
