"""Several ranks on what users train on: image rows beside text-only rows, uneven lengths, accumulation.

Every micro-step holds one modality on all ranks (the sampler), a text-only micro-batch still runs the vision path
on a stand-in image (the collator), and each labelled token of an optimizer step weighs the same however the step
is split (loss_normalization: tokens)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import ROOT, accelerate_launch, check_data_parallel, launch, overrides, read_jsonl

from conftest import FAMILIES

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def text_rows(n: int) -> list[dict]:
    """Text-only rows of uneven length (a ShareGPT-like turn beside short VQA ones)."""
    return [{"id": f"text-{i}", "conversations": [
        {"from": "human", "value": "Name a colour. " * (1 + 6 * i)},
        {"from": "gpt", "value": " ".join(["red", "green", "blue"] * (1 + 4 * i))}]} for i in range(n)]


def mixed_data(world: Path, out: Path, images: int, texts: int) -> Path:
    rows = json.loads((world / "train.json").read_text())[:images] + text_rows(texts)
    out.write_text(json.dumps(rows))
    return out


# -- the sampler: one modality per micro-step on all ranks ----------------------------------------------------


def test_every_step_holds_one_modality_on_all_ranks_with_balanced_lengths():
    from midtune.data import LengthGroupedSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 900, (403,), generator=g).tolist()
    has_images = (torch.rand(403, generator=g) < 0.9).tolist()
    world, batch = 4, 3
    sampler = LengthGroupedSampler(lengths, has_images, batch, seed=1, megabatch=4, world_size=world)
    order = list(sampler)
    assert sorted(order) == list(range(403)) and order == list(LengthGroupedSampler(
        lengths, has_images, batch, seed=1, megabatch=4, world_size=world))
    step = world * batch
    full_steps = [order[s:s + step] for s in range(0, len(order) - step + 1, step)]
    # only the gathered leftovers (fewer than one step of each modality, at the end) may mix
    leftovers = sum(has_images) % step + (403 - sum(has_images)) % step
    clean = full_steps[:(len(order) - leftovers) // step]
    assert len(clean) >= len(full_steps) - 2 and not any(len({has_images[i] for i in rows}) > 1 for rows in clean)
    assert any(len({has_images[i] for i in rows}) > 1 for rows in [order[s:s + batch] for s in range(0, 403, batch)]
               [len(clean) * world:])  # this draw's leftovers do mix: the collator's stand-in covers them
    # accelerate deals batches to ranks in turn: rank r's batch of a step is its r-th run of `batch` rows
    spread = []
    for rows in clean:
        totals = [sum(lengths[i] for i in rows[r * batch:(r + 1) * batch]) for r in range(world)]
        spread.append((max(totals) - min(totals)) / max(totals))
    assert sorted(spread)[len(spread) // 2] < 0.05  # the ranks of a step wait little for each other
    # world_size 1 is the single-process sampler: batches of one modality
    single = list(LengthGroupedSampler(lengths, has_images, batch, seed=1, megabatch=4))
    assert sorted(single) == list(range(403))


# -- the stand-in image: the vision path runs, the loss and gradients are the real rows' ------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stand_in_image_runs_the_vision_path_and_changes_no_loss_or_gradient(world, tiny_dir, tmp_path, family):
    from midtune.adapters import family_of
    from midtune.checkpoint import load_pretrained
    from midtune.data import Collator, SupervisedDataset, dummy_image_inputs
    from train.loss import causal_lm_loss

    model, processor = load_pretrained(str(tiny_dir(family)))
    model.train()
    data = tmp_path / "text.json"
    data.write_text(json.dumps(text_rows(3)))
    items = [SupervisedDataset(str(data), processor)[i] for i in range(3)]
    tower = family_of(model).parts(model).vision_tower
    pad = processor.tokenizer.pad_token_id or 0
    results = []
    for dummy in (None, dummy_image_inputs(processor)):
        model.zero_grad()
        calls: list[int] = []
        hook = tower.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        batch = Collator(pad, dummy_image=dummy)(items)
        batch.pop("sample_ids")
        loss = causal_lm_loss(model, batch)
        loss.backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, len(calls), batch))
    (loss0, grads0, calls0, _), (loss1, grads1, calls1, batch1) = results
    assert (calls0, calls1) == (0, 1)
    assert batch1["attention_mask"].sum() == sum(len(i["input_ids"]) for i in items)  # the stand-in is masked
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert set(grads0) < set(grads1)  # the vision path now has gradients: all exactly zero
    for name, grad in grads1.items():
        if name in grads0:
            torch.testing.assert_close(grad, grads0[name], rtol=1e-4, atol=1e-6)
        else:
            assert not grad.any(), name


# -- two ranks: the shipped sharded backends with a text-only rank ----------------------------------------------


def sharded_accelerate_config(tmp_path: Path, backend: str) -> Path:
    if backend == "zero3":
        config = yaml.safe_load((ROOT / "configs/accelerate/deepspeed_zero3.yaml").read_text())
        config["deepspeed_config"]["deepspeed_config_file"] = str(ROOT / "configs/deepspeed/zero3.json")
    elif backend.startswith("fsdp2"):  # the shipped FSDP2 config; run through tests/fsdp_on_cpu.py
        config = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
        config["mixed_precision"] = "bf16" if backend == "fsdp2" else "no"  # fsdp2-fp32: exact gradients
    else:
        config = yaml.safe_load((ROOT / "configs/accelerate/cpu_2proc.yaml").read_text())
    config["num_processes"] = 2
    path = tmp_path / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.two_ranks
@pytest.mark.slow
def test_zero3_with_an_image_row_and_a_text_row_at_batch_one_finishes(world, tiny_dir, tmp_path):
    """One image row and one text row, 2 ranks, batch 1: every step has a text-only rank. Before the stand-in
    image, ZeRO-3 (the frozen vision tower sharded too) stopped at the first step with gloo's "collective
    mismatch" (under NCCL: a hang); the launch's timeout catches a hang here."""
    data = mixed_data(world, tmp_path / "mixed.json", images=1, texts=1)
    out = tmp_path / "zero3"
    args = overrides(world, tiny_dir("llava"), out, data=data, batch_size=1, max_steps=3, record_samples="true",
                     **{"trainable.layers": "1", "trainable.projector": "true", "grad_accum": 2})
    proc = launch(sharded_accelerate_config(tmp_path, "zero3"), args, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_data_parallel(out, steps=3)
    steps = read_jsonl(out / "samples-rank0.jsonl")[:-1] + read_jsonl(out / "samples-rank1.jsonl")[:-1]
    assert sum("text-0" in s["samples"] for s in steps) == 3 and all(len(s["samples"]) == 2 for s in steps)


def launch_fsdp2_on_cpu(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    import os

    cmd = [*accelerate_launch(sharded_accelerate_config(tmp_path, "fsdp2")), str(ROOT / "tests" / "fsdp_on_cpu.py"),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.two_ranks
@pytest.mark.slow
def test_fsdp2_with_bf16_weights_and_a_text_row_saves_trainable_shards_only_and_resumes_exactly(
        world, tiny_dir, tmp_path):
    """The shipped FSDP2 config with a shipped-style bf16 run (dtype bfloat16: frozen weights stay bf16, what
    trains keeps fp32 masters; gradient checkpointing on), an image row and a text row at batch 1 on 2 ranks: it
    trains, each checkpoint holds only the trainable tensors (each rank its shard) and their optimizer state, and
    a resume from it continues bit for bit."""
    data = mixed_data(world, tmp_path / "mixed.json", images=1, texts=1)
    common = {"data": data, "batch_size": 1, "grad_accum": 2, "max_steps": 4, "save_steps": 2,
              "save_total_limit": 0, "record_samples": "true", "dtype": "bfloat16", "mixed_precision": "bf16",
              "gradient_checkpointing": "true", "trainable.layers": "1", "trainable.projector": "true"}
    a, b = tmp_path / "a", tmp_path / "b"
    proc = launch_fsdp2_on_cpu(tmp_path, overrides(world, tiny_dir("llava"), a, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_data_parallel(a, steps=4)
    run = json.loads((a / "run.json").read_text())
    assert run["distributed_type"] == "FSDP"
    assert run["precision"]["line"].startswith("frozen bfloat16, trainable float32, master weights float32")
    names = run["plan"]["trainable_names"]
    shards = [load_file(a / "checkpoint-2" / f"trainable-rank{r}.safetensors") for r in (0, 1)]
    assert all(set(shard) == set(names) for shard in shards)  # no frozen tensor in the checkpoint
    assert sum(t.numel() for shard in shards for t in shard.values()) == run["plan"]["num_trainable"]
    assert all(t.dtype == torch.float32 for shard in shards for t in shard.values())  # the fp32 masters
    assert not list((a / "checkpoint-2").glob("pytorch_model*")) and not list((a / "checkpoint-2").glob("*.bin"))
    delta = load_file(a / "final" / "delta.safetensors")
    assert set(delta) == set(names) and all(t.dtype == torch.bfloat16 for t in delta.values())

    b.mkdir()
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    proc = launch_fsdp2_on_cpu(tmp_path, overrides(world, tiny_dir("llava"), b, resume_from="latest", **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[m["loss"] for m in read_jsonl(d / "metrics.jsonl")] for d in (a, b)]
    assert losses[1] == losses[0][2:]  # the same losses from step 3 on
    assert read_jsonl(b / "samples-rank1.jsonl") == read_jsonl(a / "samples-rank1.jsonl")[2:]
    resumed = load_file(b / "final" / "delta.safetensors")
    assert all(torch.equal(delta[k], resumed[k]) for k in delta)


@pytest.mark.two_ranks
@pytest.mark.slow
def test_fsdp2_lora_writes_a_whole_delta_that_changes_only_what_trained(world, tiny_dir, tmp_path):
    """LoRA under FSDP2: each rank holds a slice of every adapter; final/ gathers them whole, under PEFT's names,
    and the delta merged onto the base changes what trained and nothing else."""
    from midtune.checkpoint import load_pretrained, load_with_delta

    data = mixed_data(world, tmp_path / "mixed.json", images=2, texts=2)
    out = tmp_path / "lora"
    proc = launch_fsdp2_on_cpu(tmp_path, overrides(world, tiny_dir("llava"), out, data=data, batch_size=1,
                                                   max_steps=2, method="lora", dtype="bfloat16",
                                                   mixed_precision="bf16", gradient_checkpointing="true",
                                                   **{"trainable.layers": "1", "trainable.projector": "true"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["distributed_type"] == "FSDP"
    delta = load_file(out / "final" / "delta.safetensors")
    lora_a = [k for k in delta if k.endswith("q_proj.lora_A.weight")]
    assert lora_a and delta[lora_a[0]].shape == (16, 64)  # r × hidden: whole, not a rank's slice
    base, _ = load_pretrained(str(tiny_dir("llava")), dtype="bfloat16")
    rebuilt, _ = load_with_delta(str(tiny_dir("llava")), out / "final" / "delta.safetensors", dtype="bfloat16")
    before, after = base.state_dict(), rebuilt.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the adapters merged into layer 1's projections and the projector trained; nothing else moved
    assert any(".layers.1.self_attn.q_proj" in k for k in changed) and any("projector" in k for k in changed)
    assert all(".layers.1." in k or "projector" in k for k in changed)


# -- one global batch, three splits, one gradient -------------------------------------------------------------


def step_gradients(world, model, tmp_path, name, launch_config=None, **settings):
    """The gradients of the first optimizer step of a run on 4 image rows and 4 text rows of uneven length."""
    data = mixed_data(world, tmp_path / "data.json", images=4, texts=4)
    out = tmp_path / f"{name}.safetensors"
    args = overrides(world, model, tmp_path / name, data=data, max_steps=1,
                     **{"trainable.layers": "1-2", "trainable.projector": "true", "optim.max_grad_norm": 0,
                        **settings})
    script = str(ROOT / "tests" / "step_gradients.py")
    if launch_config is None:
        cmd = [sys.executable, script, str(out), *args]
    elif "fsdp" in launch_config.name:
        cmd = [*accelerate_launch(launch_config), str(ROOT / "tests" / "fsdp_on_cpu.py"), "--step-gradients", str(out),
               *args]
    else:
        cmd = [*accelerate_launch(launch_config), script, str(out), *args]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out), json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.two_ranks
@pytest.mark.slow
def test_one_global_batch_gives_one_gradient_as_1x8_2x4_accumulated_2_ranks_x4_and_2_fsdp2_ranks(
        world, tiny_dir, tmp_path):
    model = tiny_dir("llava")
    two_ranks = sharded_accelerate_config(tmp_path, "ddp")
    runs = {
        "1x8": step_gradients(world, model, tmp_path, "1x8", batch_size=8),
        "2x4-accumulated": step_gradients(world, model, tmp_path, "2x4", batch_size=4, grad_accum=2),
        "2-ranks-x4": step_gradients(world, model, tmp_path, "ranks", two_ranks, batch_size=4),
        "2-fsdp2-ranks-x4": step_gradients(world, model, tmp_path, "fsdp2", sharded_accelerate_config(
            tmp_path, "fsdp2-fp32"), batch_size=4),
    }
    (ref, ref_info), *others = runs.values()
    assert len(ref_info["samples"]) == 8 and not ref_info["no_grad"]
    assert runs["2-fsdp2-ranks-x4"][1]["distributed_type"] == "FSDP"  # sharded, not DDP under another name
    for name, (grads, info) in list(runs.items())[1:]:
        assert info["samples"] == ref_info["samples"], name  # the same 8 rows
        assert info["loss"] == pytest.approx(ref_info["loss"], rel=1e-5), name
        for key in ref:
            torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
    # the legacy mean of micro-batch means weighs the short rows' tokens more: another gradient once split
    mean, _ = step_gradients(world, model, tmp_path, "mean", batch_size=4, grad_accum=2, loss_normalization="mean")
    differs = [k for k in ref if not torch.allclose(mean[k], ref[k], rtol=1e-3, atol=1e-6)]
    assert len(differs) > len(ref) // 2


# -- settings that mean what they say --------------------------------------------------------------------------


def test_global_batch_size_derives_accumulation_and_refuses_a_remainder():
    from train.config import ConfigError, derive_grad_accum, load_config

    base = ["model=m", "data=d", "output_dir=o", "batch_size=4"]
    config = load_config(None, [*base, "global_batch_size=128"])
    derive_grad_accum(config, 8)
    assert config.grad_accum == 4  # 128 / (4 per micro-step × 8 processes)
    config = load_config(None, [*base, "global_batch_size=128"])
    derive_grad_accum(config, 16)
    assert config.grad_accum == 2  # the same global batch on twice the GPUs
    with pytest.raises(ConfigError, match=r"'global_batch_size': 100 .* batch_size 4 × 8 processes = 32"):
        derive_grad_accum(load_config(None, [*base, "global_batch_size=100"]), 8)
    with pytest.raises(ConfigError, match="needs grad_accum 4, but grad_accum is 3"):
        derive_grad_accum(load_config(None, [*base, "global_batch_size=128", "grad_accum=3"]), 8)
    with pytest.raises(ConfigError, match="'loss_normalization'"):
        load_config(None, [*base, "loss_normalization=sum"])


def test_deepspeed_clipping_comes_from_max_grad_norm_or_a_mismatch_is_refused():
    from types import SimpleNamespace

    from train.config import ConfigError
    from train.distributed import set_deepspeed_clipping

    def accelerator(json_config: dict):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=json_config)))

    for shipped in ("zero2", "zero3"):
        config = json.loads((ROOT / f"configs/deepspeed/{shipped}.json").read_text())
        set_deepspeed_clipping(accelerator(config), 0)  # max_grad_norm=0: no clipping, not the JSON's 1.0
        assert config["gradient_clipping"] == 0.0
    set_deepspeed_clipping(accelerator({"gradient_clipping": 0.5}), 0.5)
    with pytest.raises(ConfigError, match="gradient_clipping 1.0"):
        set_deepspeed_clipping(accelerator({"gradient_clipping": 1.0}), 0.3)


def test_resume_refuses_another_world_size_batch_or_accumulation_naming_each(tmp_path):
    from train.config import ConfigError
    from train.recipe import check_resume_shape

    saved = {"data_shape": {"world_size": 8, "batch_size": 16, "grad_accum": 1, "group_by_length": True}}
    check_resume_shape(saved, dict(saved["data_shape"]), tmp_path)
    now = {"world_size": 4, "batch_size": 16, "grad_accum": 2, "group_by_length": True}
    with pytest.raises(ConfigError, match=r"world_size 8 → 4, grad_accum 1 → 2"):
        check_resume_shape(saved, now, tmp_path)
    check_resume_shape({}, now, tmp_path)  # a checkpoint from before the shape was recorded: a warning only


def test_the_nan_stop_hint_is_valid_under_the_backend_in_use(tmp_path):
    from types import SimpleNamespace

    from train.config import load_config
    from train.stopping import nonfinite_error

    config = load_config(None, ["model=m", "data=d", f"output_dir={tmp_path}"])
    dataset = SimpleNamespace(samples=SimpleNamespace(locations=lambda: {}))
    window = [(["a"], torch.tensor(float("nan")))]
    for backend, available in (("MULTI_GPU", True), ("DEEPSPEED", False)):
        acc = SimpleNamespace(distributed_type=SimpleNamespace(name=backend), num_processes=1)
        error = nonfinite_error(acc, config, dataset, window, 3, tmp_path, [])
        assert error.skip_available is available and ("'skip' drops such steps" in str(error)) is available


def test_compare_names_the_tracker_project_after_the_experiment_and_the_run_after_the_training():
    from compare.experiment import read_experiment

    experiment = read_experiment(ROOT / "configs/experiments/llava-1.5-7b.yaml")
    trainings = [s for s in experiment.stages if s.kind == "train"]
    assert trainings
    for stage in trainings:
        assert f"project={experiment.name}" in stage.command and f"run_name={stage.name}" in stage.command


def test_compare_refuses_a_missing_analysis_pairs_file_before_anything_trains(tmp_path):
    """configs/experiments/llava-1.5-7b.yaml names data/pairs/coco_val_pairs.jsonl: without it the analysis
    stage used to fail after every training and evaluation had run."""
    proc = subprocess.run([sys.executable, "-m", "compare", str(ROOT / "configs/experiments/llava-1.5-7b.yaml"),
                           "--set", f"output_dir={tmp_path / 'exp'}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "analysis: data/pairs/coco_val_pairs.jsonl does not exist" in proc.stderr
    assert "data/LLaVA-Instruct/llava_v1_5_mix665k.json does not exist" in proc.stderr
    assert not (tmp_path / "exp").exists()  # nothing ran, nothing was written


def test_compare_refuses_an_unknown_task_name_before_anything_trains(world, tiny_dir, tmp_path, capsys):
    from compare.__main__ import main as compare_main
    from conftest import experiment_file

    path = experiment_file(tmp_path, tiny_dir("llava"), world, eval={"tasks": ["midtune_shapes_colr"]})
    assert compare_main([str(path)]) == 2
    assert "eval: unknown task: 'midtune_shapes_colr' (did you mean midtune_shapes_color" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_fsdp_refuses_bf16_frozen_beside_fp32_trainable_without_its_mixed_precision():
    from types import SimpleNamespace

    from train.config import ConfigError, load_config
    from train.precision import check_precision

    def fsdp(mixed_precision):
        return SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), mixed_precision=mixed_precision,
                               scaler=None)

    config = load_config(None, ["model=m", "data=d", "output_dir=o", "dtype=bfloat16", "mixed_precision=bf16"])
    check_precision(fsdp("bf16"), config)  # what the shipped configs run: accepted
    with pytest.raises(ConfigError, match="mixed_precision=bf16.*dtype=float32"):
        check_precision(fsdp("no"), config)
