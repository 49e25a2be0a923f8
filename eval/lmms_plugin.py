"""lmms-eval model `midtune`: any supported VLM family, from a merged directory, a hub id, or a base + a midtune delta.

Registered through the entry point `[project.entry-points."lmms_eval.models"] midtune =
"eval.lmms_plugin:MANIFEST"`, so with this package installed:

    lmms-eval --model midtune --model_args pretrained=runs/demo/middle/final --tasks ...
    --model_args pretrained=BASE,delta=RUN/final/delta.safetensors      # base + delta (base hash verified)
    --model_args pretrained=RUN/final/delta.safetensors                 # base from the delta's metadata
    --model_args pretrained=llava-hf/llava-1.5-7b-hf,dtype=bfloat16,batch_size=8

Arguments: `pretrained`, `delta`, `device` (auto: cuda if available, else cpu), `dtype` (auto: bfloat16 on GPU,
float32 on CPU), `batch_size` (default 1, as lmms-eval's `llava_hf`), `trust_remote_code`, `verify_base` (check
the delta's base hash, default on), `chat_template` (a template string or .jinja file, default: the processor's),
`system_prompt`, `attn_implementation` (sdpa by default, as in training; eager, flash_attention_2 with
flash-attn), `min_pixels` / `max_pixels` (Qwen2-VL/2.5-VL's pixel budget per image; default: the processor's,
which training saves). Unknown arguments are accepted and ignored with a warning.

Prompts are built with the processor's chat template: one user turn whose content is the request's images (as
`{"type": "image"}` parts, first) followed by the text — the way midtune's training data renders `<image>\\n...`.
A context that itself contains one `<image>` placeholder per image keeps them where they are.

Data parallel: under `accelerate launch` / `torchrun` (or `python -m eval --num-processes N`) each process joins
accelerate's process group, takes its local GPU (`cuda:LOCAL_RANK`; on the CPU, gloo) and reports its `rank` and
`world_size`, so lmms-eval gives it its share of each task's documents and gathers the results on rank 0 — the
contract of lmms-eval's own `llava_hf`.

* `generate_until`: batched generation with LEFT padding; honours `until` (stop strings; the text is cut at the
  first one), `max_new_tokens`, `temperature` (0 → greedy), `do_sample`, `top_p`, `top_k`, `num_beams`. Where the
  task sets none, `llava_hf`'s defaults: 1024 new tokens, greedy, one beam. Generation ends at the end-of-sequence
  token (the model's `generation_config.eos_token_id`s and the tokenizer's), so a long budget costs nothing on a
  short answer.
* `loglikelihood`: the negative log-likelihood (a sum over the continuation's tokens) of the continuation as the
  assistant's answer after the context, and whether greedy decoding would produce it. The NLL, not the
  log-probability: lmms-eval's multiple choice takes the argmin. Each result is a `LoglikelihoodResult`, which
  unpacks as `(nll, is_greedy)` and is an lmms-eval `GenerationResult` (lmms-eval 0.7.3 turns a plain tuple into
  a string). Batched with right padding, so padding never moves a position.
* `generate_until_multi_round`: round 0 answers the context; later rounds ask the task's `doc_to_text(doc,
  previous_output=..., round_idx=..., previous_round_info=...)` for the next context until it signals the end.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path


def _manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="midtune", simple_class_path="eval.lmms_plugin.Midtune")


def __getattr__(name: str):
    # Importing this module first imports lmms_eval.models, whose registry loads this entry point while this
    # module is still half-initialised; MANIFEST must already be readable then (a plain global defined below
    # the imports would not be yet).
    if name == "MANIFEST":
        return _manifest()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from lmms_eval.api.instance import GenerationResult  # noqa: E402 (after __getattr__, see above)
from lmms_eval.api.model import lmms  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from eval.parallel import launched_world_size  # noqa: E402
from midtune.sources import ModelSource, resolve_device, resolve_dtype, resolve_source  # noqa: E402, F401

MANIFEST = _manifest()

GEN_PASSTHROUGH = ("top_p", "top_k", "num_beams", "repetition_penalty", "min_new_tokens", "length_penalty")
# lmms-eval's `llava_hf` (models/simple/llava_hf.py and chat/llava_hf.py, 0.7.3) where a task's generation_kwargs
# set none: 1024 new tokens, temperature 0 (greedy), one beam. Matching them makes a benchmark that relies on them
# score the same through either model.
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_NUM_BEAMS = 1
MAX_ROUNDS = 64


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


class LoglikelihoodResult(GenerationResult):
    """`(nll, is_greedy)` that lmms-eval passes through intact (0.7.3 stringifies plain tuples)."""

    def __init__(self, nll: float, is_greedy: bool):
        super().__init__(text=(float(nll), bool(is_greedy)))

    @property
    def nll(self) -> float:
        return self.text[0]

    @property
    def is_greedy(self) -> bool:
        return self.text[1]

    def __iter__(self):
        return iter(self.text)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return self.text[i]

    def __repr__(self) -> str:
        return f"LoglikelihoodResult(nll={self.nll!r}, is_greedy={self.is_greedy!r})"


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class Midtune(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, delta: str | None = None, device: str | None = None,
                 dtype: str | None = "auto", batch_size: int | str = 1, trust_remote_code: bool = False,
                 verify_base: bool = True, chat_template: str | None = None, system_prompt: str | None = None,
                 attn_implementation: str | None = "sdpa", min_pixels: int | str | None = None,
                 max_pixels: int | str | None = None, **kwargs) -> None:
        super().__init__()
        import torch

        from midtune.checkpoint import load_pretrained, load_with_delta

        ignored = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
        if ignored:
            warnings.warn(f"midtune model: ignoring unknown arguments {sorted(ignored)}", stacklevel=2)
        self.source = resolve_source(pretrained, delta)
        self._device = torch.device(resolve_device(device))
        world = launched_world_size()
        if world > 1:  # before loading: the model goes to this process's own GPU
            self._join_processes(world)
        self.dtype_name = resolve_dtype(dtype, str(self._device))
        trust_remote_code = _as_bool(trust_remote_code)
        if self.source.delta:
            model, processor = load_with_delta(self.source.pretrained, self.source.delta, dtype=self.dtype_name,
                                               trust_remote_code=trust_remote_code,
                                               verify_base=_as_bool(verify_base),
                                               attn_implementation=attn_implementation or None)
        else:
            model, processor = load_pretrained(self.source.pretrained, dtype=self.dtype_name,
                                               trust_remote_code=trust_remote_code,
                                               attn_implementation=attn_implementation or None)
        self._model = model.to(self._device).eval()
        from midtune.adapters import set_image_pixels  # Qwen's pixel budget; default: the saved processor's

        set_image_pixels(processor, _as_int(min_pixels), _as_int(max_pixels))
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.chat_template = _read_template(chat_template)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        if not (self.chat_template or getattr(processor, "chat_template", None)
                or getattr(self._tokenizer, "chat_template", None)):
            raise ValueError(f"model {self.source.describe()!r}: its processor has no chat template; save one with "
                             f"the processor or pass chat_template=<template or .jinja file>")
        self._forward_keys = _accepted_keys(self._model.forward)

    def _join_processes(self, world: int) -> None:
        """One of `world` launched processes: join accelerate's process group (gloo on the CPU), take the local GPU
        (an index in `device` is the launcher's to choose, as in llava_hf) and report rank and world size, from
        which lmms-eval shards each task's documents and gathers the results."""
        from accelerate import Accelerator

        from eval.parallel import no_group_message

        accelerator = Accelerator(cpu=self._device.type == "cpu")
        if accelerator.num_processes != world:
            raise ValueError(no_group_message(world, accelerator.num_processes))
        if self._device.type == "cuda":
            self._device = accelerator.device
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

    # -- properties lmms-eval and users read -------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    # -- prompts -------------------------------------------------------------------------------------------
    def build_prompt(self, context: str, n_images: int) -> str:
        """The chat-template text of one user turn (images first, then `context`) + the assistant prefix."""
        from midtune.data import user_prompt  # the renderer training used: text-content templates, images

        return user_prompt(self.processor, context, n_images, self.system_prompt, self.chat_template)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        out = []
        for v in _flatten(visuals):
            if hasattr(v, "convert"):  # a PIL image
                out.append(v.convert("RGB"))
            else:
                raise ValueError(f"task {task!r}: the midtune model takes images only, but doc {doc_id} gives a "
                                 f"{type(v).__name__} visual ({str(v)[:80]!r}) — video/audio are not supported")
        from midtune.images import fit_images  # shaped as the model trained (image_aspect_ratio, saved with it)

        return fit_images(self.processor, out)

    def _encode(self, texts: list[str], images: list[list], padding_side: str) -> dict:
        import torch

        flat = [im for ims in images for im in ims]
        self._tokenizer.padding_side = padding_side
        kwargs: dict = {"text": texts, "return_tensors": "pt", "padding": True}
        if flat:
            kwargs["images"] = flat
        from midtune.data import add_special_tokens_for  # no second BOS after a template that wrote one

        batch = self.processor(**kwargs, add_special_tokens=add_special_tokens_for(self._tokenizer, texts[0]))
        out = {}
        for key, value in batch.items():
            if self._forward_keys is not None and key not in self._forward_keys:
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(self._device)
                if value.is_floating_point():
                    value = value.to(self._model.dtype)
            out[key] = value
        return out

    # -- generation ------------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        items = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((self.build_prompt(context, len(visuals)), visuals, dict(gen_kwargs or {})))
        results: list[str | None] = [None] * len(items)
        pbar = tqdm(total=len(items), desc="midtune generate", disable=self.rank != 0)
        for idx in _batches(items, self.batch_size, key=lambda it: _gen_key(it[2])):
            texts = self.generate_batch([items[i][0] for i in idx], [items[i][1] for i in idx], items[idx[0]][2])
            for i, text in zip(idx, texts):
                results[i] = text
            pbar.update(len(idx))
        pbar.close()
        return results

    def generate_batch(self, prompts: list[str], images: list[list], gen_kwargs: dict) -> list[str]:
        """Generate for already-templated prompts in one left-padded batch; texts cut at the first stop string."""
        import torch

        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        inputs = self._encode(prompts, images, padding_side="left")
        prompt_len = inputs["input_ids"].shape[1]
        kwargs = generation_settings(gen_kwargs)
        eos = self._model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self._tokenizer.eos_token_id is not None and self._tokenizer.eos_token_id not in eos:
            eos.append(self._tokenizer.eos_token_id)
        if until:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(until, self._tokenizer, prompt_len)])
        with torch.inference_mode():
            out = self._model.generate(**inputs, **kwargs, eos_token_id=eos or None,
                                       pad_token_id=self._tokenizer.pad_token_id)
        texts = self._tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        return [cut_at_stops(t, until) for t in texts]

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        from tqdm.auto import tqdm

        results = []
        for req in tqdm(requests, desc="midtune multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args[:7]
            gen_kwargs = dict(gen_kwargs or {})
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            outputs: list[str] = []
            info = None
            for round_idx in range(MAX_ROUNDS):
                prompt = self.build_prompt(context, len(visuals))
                outputs.append(self.generate_batch([prompt], [visuals], gen_kwargs)[0])
                payload = doc_to_text(doc, previous_output=list(outputs), round_idx=round_idx + 1,
                                      previous_round_info=info)
                if isinstance(payload, tuple) and len(payload) == 5:
                    next_visuals, next_context, terminal, updated, info = payload
                    if updated is not None:
                        outputs = list(updated)
                    if terminal:
                        break
                    if next_context is not None:
                        context = next_context
                    visuals = [v.convert("RGB") for v in _flatten(next_visuals)] if next_visuals is not None else []
                elif isinstance(payload, str):
                    context = payload
                else:
                    break
            results.append(outputs)
        return results

    # -- log-likelihood --------------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[LoglikelihoodResult]:
        from tqdm.auto import tqdm

        items = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # unconditional requests (acc_mutual_info): no document, no image
                context, continuation = args
                visuals = []
            else:
                context, target, doc_to_visual, doc_id, task, split = args[:6]
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((self.build_prompt(context, len(visuals)), str(continuation), visuals))
        results: list[LoglikelihoodResult | None] = [None] * len(items)
        pbar = tqdm(total=len(items), desc="midtune loglikelihood", disable=self.rank != 0)
        for idx in _batches(items, self.batch_size, key=lambda it: 0, length=lambda it: len(it[0]) + len(it[1])):
            scored = self.score_batch([items[i][0] for i in idx], [items[i][1] for i in idx],
                                      [items[i][2] for i in idx])
            for i, result in zip(idx, scored):
                results[i] = result
            pbar.update(len(idx))
        pbar.close()
        return results

    def score_batch(self, prompts: list[str], continuations: list[str],
                    images: list[list]) -> list[LoglikelihoodResult]:
        """NLL (sum over tokens) of each continuation after its templated prompt, and whether it is greedy."""
        import torch

        from midtune.scoring import continuation_length, score_continuations

        lengths = [continuation_length(self._tokenizer, p, c) for p, c in zip(prompts, continuations)]
        inputs = self._encode([p + c for p, c in zip(prompts, continuations)], images, padding_side="right")
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        scores = score_continuations(logits, inputs["input_ids"], inputs["attention_mask"], lengths)
        return [LoglikelihoodResult(s.nll, s.is_greedy) for s in scores]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def generation_settings(gen_kwargs: dict) -> dict:
    """lmms-eval generation kwargs → `generate()` kwargs. temperature 0 (or do_sample false) → greedy."""
    temperature = gen_kwargs.get("temperature")
    temperature = float(temperature) if temperature is not None else None
    if "do_sample" in gen_kwargs:
        sample = _as_bool(gen_kwargs["do_sample"])
    else:
        sample = temperature is not None and temperature > 0
    if temperature == 0:
        sample = False
    kwargs: dict = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                    "do_sample": sample, "num_beams": DEFAULT_NUM_BEAMS}  # not the model's generation_config's
    if sample:
        kwargs["temperature"] = temperature if temperature is not None else 1.0
    else:  # greedy: leave no sampling settings for generate() to warn about
        kwargs.update(temperature=None, top_p=None, top_k=None)
    for key in GEN_PASSTHROUGH:
        if gen_kwargs.get(key) is not None and (sample or key not in ("top_p", "top_k")):
            kwargs[key] = gen_kwargs[key]
    return kwargs


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Per-row stopping once a stop string appears in the generated text (only looks at the recent tokens)."""

    def __init__(self, stops: list[str], tokenizer, prompt_len: int):
        self.stops = stops
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.window = max(len(s) for s in stops) + 4

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.prompt_len:]
        tails = self.tokenizer.batch_decode(new[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


def _batches(items: list, size: int, key, length=lambda it: len(it[0])) -> list[list[int]]:
    """Indices grouped by `key` (same generation settings), longest first within a group, then chunked."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    out = []
    for members in groups.values():
        members.sort(key=lambda i: -length(items[i]))
        out += [members[k:k + size] for k in range(0, len(members), size)]
    return out


def _gen_key(gen_kwargs: dict) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_int(value) -> int | None:
    """A model argument that is a whole number (lmms-eval passes model args as strings), or None."""
    if value is None or value == "":
        return None
    return int(float(value)) if isinstance(value, str) else int(value)


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return 1
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return size


def _read_template(value: str | None) -> str | None:
    if value and os.path.isfile(value):
        return Path(value).read_text()
    return value or None


def _accepted_keys(fn) -> set[str] | None:
    """Parameter names `fn` takes, or None when it takes **kwargs (then every processor output is passed)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)
