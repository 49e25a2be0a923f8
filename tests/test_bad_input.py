"""Bad input, table-driven: each malformed input below is refused by the command a user runs (`python -m train`,
`python -m eval`, `python -m analysis`) with its own message naming the file, row, key or argument, a non-zero
exit, and nothing written: the case's whole directory is byte-for-byte what it was before the command ran.

Rows marked `cli` run the real command in a subprocess; the others call the same `main(argv)` in-process, which
is what `python -m` runs, to keep the table fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    """One case's world: the shared shapes world and tiny model, a private directory, and file builders."""

    world: Path
    model: Path
    trained: Path  # a finished 1-step run (checkpoint-1, final/delta.safetensors) of `model`, layers 1-2
    other_base: Path  # `model` with different weights
    dir: Path

    @property
    def out(self) -> Path:  # where the command would write; it must not appear
        return self.dir / "out"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    def rows(self, n: int = 4) -> list[dict]:
        return json.loads((self.world / "train.json").read_text())[:n]

    def data(self, change: Callable[[dict], object], name: str = "data.json") -> Path:
        """The world's first 4 training rows as a JSON list, row 2 replaced by change(row 2) (or changed in place)."""
        rows = self.rows()
        replaced = change(rows[2])
        if replaced is not None:
            rows[2] = replaced
        return self.write(name, json.dumps(rows))

    def train(self, **overrides) -> list[str]:
        """A valid one-step training command line, with `overrides` (None removes a key)."""
        args = {"model": self.model, "data": self.world / "train.json", "image_folder": self.world / "images",
                "output_dir": self.out, "max_steps": 1, "batch_size": 2, "report_to": "[]",
                "trainable.layers": "1-2", **overrides}
        return [f"{k}={v}" for k, v in args.items() if v is not None]

    def pairs(self, lines: list[str] | None = None, change: Callable[[dict], object] | None = None) -> Path:
        """The world's first 8 pairs as JSONL (row 2 changed), or the given lines."""
        if lines is None:
            rows = [json.loads(line) for line in (self.world / "pairs.jsonl").read_text().splitlines()[:8]]
            replaced = change(rows[2]) if change else None
            if replaced is not None:
                rows[2] = replaced
            lines = [json.dumps(r) for r in rows]
        return self.write("pairs.jsonl", "\n".join(lines) + "\n")

    def eval(self, *args: str) -> list[str]:
        return [*map(str, args), "--output_dir", str(self.out)]

    def profile(self, pairs: Path, *extra: str) -> list[str]:
        return ["profile", "--model", str(self.model), "--pairs", str(pairs), "--image-folder",
                str(self.world / "images"), "--out", str(self.out), "--k", "3", "--no-progress", *extra]

    def checkpoint(self, damage: Callable[[Path], None] | None = None) -> Path:
        """A copy of the trained run's checkpoint under out/ (to resume from), damaged by `damage`."""
        path = self.out / "checkpoint-1"
        shutil.copytree(self.trained / "checkpoint-1", path)
        if damage:
            damage(path)
        return path


@dataclass
class Case:
    id: str
    app: str  # train | train.export | eval | analysis
    argv: Callable[[Env], list[str]]
    needles: tuple[str, ...]  # in the error; formatted with the Env's fields ({dir}, {world}, {model}, ...)
    code: int = 2
    cli: bool = False  # run `python -m <app>` in a subprocess


def with_(**values):
    """A row change: set keys."""
    return lambda row: row.update(values)


def without(key: str):
    """A row change: remove a key."""
    return lambda row: row.pop(key) and None


def turn(index: int, **values):
    """A row change: set keys of one conversation turn."""
    return lambda row: row["conversations"][index].update(values)


class Evil:
    """Unpickling this would run a shell command: a tampered checkpoint file must be refused, not loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def without_value(row: dict) -> None:
    del row["conversations"][1]["value"]


def existing_run(e: Env) -> list[str]:
    e.write("out/metrics.jsonl", '{"step": 1}\n')
    return e.train()


def truncated_model(e: Env) -> Path:
    shutil.copytree(e.model, e.dir / "model")
    weights = e.dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # a download or copy cut short
    return e.dir / "model"


def tamper_optimizer(checkpoint: Path) -> None:
    torch.save({"state": Evil(checkpoint.parents[1] / "PWNED")}, checkpoint / "optimizer.pt")


CASES = [
    # -- data files and rows -------------------------------------------------------------------------------
    Case("data-file-missing", "train", lambda e: e.train(data=e.dir / "nope.json"),
         ("{dir}/nope.json: data file or directory does not exist",)),
    Case("data-not-a-list", "train", lambda e: e.train(data=e.write("d.json", '{"id": 1}')),
         ("{dir}/d.json: expected a JSON list of rows",)),
    Case("data-jsonl-bad-line", "train",
         lambda e: e.train(data=e.write("d.jsonl", json.dumps(e.rows(1)[0]) + "\n{not json\n")),
         ("{dir}/d.jsonl: row 1: not valid JSON",)),
    Case("row-not-an-object", "train", lambda e: e.train(data=e.data(lambda row: "just text")),
         ("{dir}/data.json: row 2 (id=None): expected an object, got str",)),
    Case("row-no-conversations", "train", lambda e: e.train(data=e.data(lambda row: {"id": "x", "image": "a.png"})),
         ("{dir}/data.json: row 2 (id='x'): no 'conversations' (or 'text') field",)),
    Case("row-empty-conversations", "train", lambda e: e.train(data=e.data(with_(conversations=[]))),
         ("row 2 (id='train_000002'): 'conversations' must be a non-empty list",)),
    Case("turn-without-value", "train", lambda e: e.train(data=e.data(without_value)),
         ("row 2 (id='train_000002'): turn 1 must be an object with 'from' and 'value'",)),
    Case("turn-unknown-role", "train", lambda e: e.train(data=e.data(turn(0, **{"from": "robot"}))),
         ("{dir}/data.json: row 2 (id='train_000002'): turn 0 has unknown role 'robot'",), cli=True),
    Case("no-assistant-turn", "train", lambda e: e.train(data=e.data(lambda row: row.update(
        conversations=row["conversations"][:1]))), ("row 2 (id='train_000002'): no assistant (gpt) turn",)),
    Case("placeholder-in-answer", "train", lambda e: e.train(data=e.data(turn(1, value="<image> red"))),
         ("row 2 (id='train_000002'): turn 1: <image> outside a human turn",)),
    Case("placeholder-without-image", "train", lambda e: e.train(data=e.data(without("image"))),
         ("row 2 (id='train_000002'): <image> in the conversation but the row has no image",)),
    Case("image-without-placeholder", "train", lambda e: e.train(data=e.data(turn(0, value="what is this?"))),
         ("row 2 (id='train_000002'): the row has an image but no <image> in any human turn",)),
    Case("text-row-empty", "train", lambda e: e.train(data=e.data(lambda row: {"id": "t", "text": "  "})),
         ("{dir}/data.json: row 2 (id='t'): empty text",)),
    # -- images --------------------------------------------------------------------------------------------
    Case("image-missing", "train", lambda e: e.train(data=e.data(with_(image="train/nowhere.png"))),
         ("row 2 (id='train_000002'): image file not found: {world}/images/train/nowhere.png",)),
    Case("image-corrupt", "train", lambda e: e.train(  # outside the world's folder: allowed here, and corrupt
        data=e.data(with_(image=str(e.write("img/broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)))),
        allow_outside_images="true"),
        ("row 2 (id='train_000002'): unreadable or corrupt image {dir}/img/broken.png",)),
    Case("image-escapes-folder", "train", lambda e: e.train(data=e.data(with_(image="../../etc/passwd"))),
         ("row 2 (id='train_000002'): image path '../../etc/passwd' escapes the image folder",
          "set allow_outside_images to permit")),
    Case("image-field-not-a-path", "train", lambda e: e.train(data=e.data(with_(image=7))),
         ("row 2 (id='train_000002'): 'image' must be a path (or list of paths), got int",)),
    Case("image-folder-missing", "train", lambda e: e.train(image_folder=e.dir / "no-images"),
         ("image_folder '{dir}/no-images' is not a directory",)),
    Case("image-cut-by-max-length", "train", lambda e: e.train(max_length=8, on_image_truncation="error"),
         ("{world}/train.json: row 0 (id='train_000000'):", "exceed max_length=8",
          "truncation would cut through image tokens")),
    # -- configs, the run directory, models ----------------------------------------------------------------
    Case("config-file-missing", "train", lambda e: ["--config", str(e.dir / "run.yaml")],
         ("config file '{dir}/run.yaml' does not exist",)),
    Case("config-not-yaml", "train", lambda e: ["--config", str(e.write("run.yaml", "model: [unclosed\n"))],
         ("{dir}/run.yaml: not valid YAML at line 2, column 1: did not find expected ',' or ']'",)),
    Case("config-not-a-mapping", "train", lambda e: ["--config", str(e.write("run.yaml", "- model\n- data\n"))],
         ("{dir}/run.yaml: expected a mapping of keys at the top level",)),
    Case("config-unknown-key-in-file", "train",
         lambda e: ["--config", str(e.write("run.yaml", "optim:\n  learning_rate: 0.1\n")), *e.train()],
         ("{dir}/run.yaml: unknown key 'optim.learning_rate'; did you mean 'optim.lr'?",)),
    Case("override-unknown-key", "train", lambda e: e.train(**{"trainable.layrs": 2}),
         ("unknown key 'trainable.layrs'; did you mean 'trainable.layers'?",)),
    Case("override-without-equals", "train", lambda e: [*e.train(), "max_steps"],
         ("override 'max_steps': expected key=value",)),
    Case("value-of-wrong-type", "train", lambda e: e.train(batch_size="four"),
         ("override 'batch_size=four': key 'batch_size'",)),
    Case("value-not-a-choice", "train", lambda e: e.train(on_nan_loss="ignore"),
         ("key 'on_nan_loss': 'ignore' is not one of 'error', 'skip'",)),
    Case("value-out-of-range", "train", lambda e: e.train(max_nan_skips=-1),
         ("key 'max_nan_skips': must be ≥ 0, got -1",)),
    Case("required-key-missing", "train", lambda e: e.train(output_dir=None),
         ("missing required key(s): output_dir",)),
    Case("existing-run", "train", lambda e: existing_run(e),
         ("output_dir '{dir}/out' already holds a run (metrics.jsonl)", "overwrite=true")),
    Case("unsupported-model", "train", lambda e: e.train(model=e.write("gpt/config.json", json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})).parent),
         ("unsupported model (architectures=['GPT2LMHeadModel'], model_type='gpt2'); midtune supports:",)),
    Case("model-missing", "train", lambda e: e.train(model=e.dir / "no-model"),
         ("model '{dir}/no-model': no such model directory",)),
    Case("model-weights-truncated", "train", lambda e: e.train(model=truncated_model(e)),
         ("model '{dir}/model': cannot load it: SafetensorError",)),
    # -- layer specs ---------------------------------------------------------------------------------------
    Case("layer-out-of-range", "train", lambda e: e.train(**{"trainable.layers": 40}),
         ("trainable.layers: layer 40 is out of range for a model with 4",)),
    Case("layer-range-empty", "train", lambda e: e.train(**{"trainable.layers": "3-1"}),
         ("trainable.layers: '3-1' selects no layers",)),
    Case("layer-fraction-outside", "train", lambda e: e.train(**{"trainable.layers": "middle:1.5"}),
         ("trainable.layers: 'middle:1.5': fraction 1.5 is outside (0, 1]",)),
    Case("layer-listed-twice", "train", lambda e: e.train(**{"trainable.layers": "[3,-1]"}),
         ("trainable.layers: 3 and -1 in [3, -1] are the same layer",)),
    Case("layer-form-unknown", "train", lambda e: e.train(**{"trainable.layers": "mid:0.5"}),
         ("trainable.layers: unknown form 'mid:0.5'", "did you mean 'middle:'?")),
    Case("nothing-would-train", "train", lambda e: e.train(**{"trainable.layers": "none"}),
         ("trainable: nothing would train",)),
    Case("vision-layers-out-of-range", "train", lambda e: e.train(**{"trainable.vision_tower": "last:9"}),
         ("trainable.vision_tower", "'last:9' asks for 9 layers but the model has 2")),
    # -- checkpoints and deltas ----------------------------------------------------------------------------
    Case("resume-without-checkpoint", "train", lambda e: e.train(resume_from="latest"),
         ("resume_from=latest: no complete checkpoint-* in {dir}/out",)),
    Case("resume-incomplete-checkpoint", "train", lambda e: e.train(resume_from=e.checkpoint(
        lambda c: (c / "trainer_state.json").unlink())),
         ("resume_from='{dir}/out/checkpoint-1': not a complete checkpoint (no trainer_state.json)",)),
    Case("resume-corrupt-tensors", "train", lambda e: e.train(resume_from=e.checkpoint(
        lambda c: (c / "trainable.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"))),
         ("{dir}/out/checkpoint-1/trainable.safetensors: not a readable safetensors file",)),
    Case("resume-other-runs-checkpoint", "train", lambda e: e.train(resume_from=e.checkpoint(), **{
        "trainable.layers": "2-3"}), ("{dir}/out/checkpoint-1/trainable.safetensors: a checkpoint of a different "
                                      "trainable set", "which this run does not train")),
    Case("resume-tampered-optimizer", "train", lambda e: e.train(resume_from=e.checkpoint(tamper_optimizer)),
         ("{dir}/out/checkpoint-1/optimizer.pt: refused to load", "GLOBAL posix.system", "has been altered")),
    Case("export-delta-missing", "train.export", lambda e: ["--base", e.model, "--delta", e.dir / "delta.safetensors",
                                                             "--out", e.out],
         ("delta '{dir}/delta.safetensors' does not exist",)),
    Case("eval-model-missing", "eval", lambda e: e.eval("--model", f"a={e.dir / 'no-run' / 'final'}"),
         ("model a: checkpoint directory '{dir}/no-run/final' does not exist",), cli=True),
    Case("eval-delta-not-safetensors", "eval",
         lambda e: e.eval("--model", f"a={e.write('delta.safetensors', b'garbage')}"),
         ("model a: delta '{dir}/delta.safetensors': not a readable safetensors file",)),
    Case("eval-safetensors-not-a-delta", "eval",
         lambda e: e.eval("--model", f"a={shutil.copy(e.model / 'model.safetensors', e.dir / 'weights.safetensors')}"),
         ("model a: delta '{dir}/weights.safetensors': not a midtune delta",)),
    Case("eval-delta-on-another-base", "eval",
         lambda e: e.eval("--model", f"a={e.trained / 'final' / 'delta.safetensors'}@{e.other_base}"),
         ("model a: delta", "was trained on base", "but '{other_base}' has different weights")),
    # -- pairs files ---------------------------------------------------------------------------------------
    Case("pairs-file-missing", "analysis", lambda e: e.profile(e.dir / "pairs.jsonl"),
         ("pairs file '{dir}/pairs.jsonl' does not exist",), cli=True),
    Case("pairs-bad-json", "analysis", lambda e: e.profile(e.pairs(["{not json"])),
         ("{dir}/pairs.jsonl: line 1: not valid JSON",)),
    Case("pairs-no-caption", "analysis", lambda e: e.profile(e.pairs(change=without("caption"))),
         ("{dir}/pairs.jsonl: line 3: missing or empty 'caption'",)),
    Case("pairs-image-missing", "analysis", lambda e: e.profile(e.pairs(change=with_(image="test/nowhere.png"))),
         ("{dir}/pairs.jsonl: 1 image file(s) not found",
          "line 3 (id='test_000002'): {world}/images/test/nowhere.png")),
    Case("pairs-image-escapes", "analysis", lambda e: e.profile(e.pairs(change=with_(image="/etc/hostname"))),
         ("{dir}/pairs.jsonl: line 3 (id='test_000002'): image path '/etc/hostname' escapes the image folder",)),
    Case("pairs-label-missing", "analysis", lambda e: e.profile(e.pairs(), "--label", "mood"),
         ("{dir}/pairs.jsonl: line 1 (id='test_000000'): no label 'mood'",)),
    Case("pairs-labels-not-an-object", "analysis", lambda e: e.profile(e.pairs(change=with_(labels=["red"]))),
         ("{dir}/pairs.jsonl: line 3 (id='test_000002'): 'labels' must be an object",)),
    Case("pairs-no-question", "analysis", lambda e: e.profile(e.pairs(change=without("question"))),
         ("{dir}/pairs.jsonl: line 3 (id='test_000002'): no 'question'", "--protocol describe")),
    Case("pairs-duplicate-id", "analysis", lambda e: e.profile(e.pairs(change=with_(id="test_000000"))),
         ("{dir}/pairs.jsonl: duplicate pair id 'test_000000'",)),
    Case("pairs-too-few-for-k", "analysis", lambda e: e.profile(e.pairs(), "--k", "30"),
         ("8 pairs", "k + 2 = 32")),
    Case("analysis-tensors-without-base", "analysis",
         lambda e: e.profile(e.pairs(), "--model", str(e.trained / "checkpoint-1")),  # the later --model wins
         ("trainable.safetensors", "give the model they belong to with --base")),
    # -- command-line arguments ----------------------------------------------------------------------------
    Case("train-unknown-option", "train", lambda e: ["--confg", "run.yaml"],
         ("unrecognized arguments: --confg",), cli=True),
    Case("eval-limit-zero", "eval", lambda e: e.eval("--model", f"a={e.model}", "--limit", "0"),
         ("argument --limit: --limit must be > 0, got 0",)),
    Case("eval-bad-model-name", "eval", lambda e: e.eval("--model", f"my model={e.model}"),
         ("--model 'my model=", "the name 'my model' must be letters, digits")),
    Case("eval-name-twice", "eval", lambda e: e.eval("--model", f"a={e.model}", "--model", f"a={e.model}"),
         ("the name 'a' is used twice",)),
    Case("eval-no-tasks", "eval", lambda e: e.eval("--model", f"a={e.model}", "--tasks", " , "), ("--tasks is empty",)),
    Case("eval-include-path-missing", "eval",
         lambda e: e.eval("--model", f"a={e.model}", "--include_path", e.dir / "tasks"),
         ("--include_path '{dir}/tasks' is not a directory",)),
    Case("analysis-batch-size-zero", "analysis", lambda e: e.profile(e.pairs(), "--batch-size", "0"),
         ("--batch-size must be >= 1, got 0",)),
    Case("analysis-dtype-unknown", "analysis", lambda e: e.profile(e.pairs(), "--dtype", "float8"),
         ("argument --dtype: invalid choice: 'float8'",)),
    Case("analysis-window-too-wide", "analysis", lambda e: ["intervene", "--model", str(e.model), "--world",
                                                            str(e.world), "--tasks", "color", "--limit", "1",
                                                            "--window", "9", "--out", str(e.out)], ("window 9",)),
]


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(world, tiny_dir, tmp_path_factory):
    """A finished one-step run of the tiny model (layers 1-2), and a copy of the model with other weights."""
    import transformers
    from accelerate.state import AcceleratorState, GradientState

    from train.config import load_config
    from train.recipe import train

    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_dir("llava")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(load_config(None, [f"model={model}", f"data={world / 'train.json'}", f"image_folder={world / 'images'}",
                             f"output_dir={root / 'trained'}", "max_steps=1", "batch_size=2", "report_to=[]",
                             "trainable.layers=1-2", "save_merged=false"]))
    other = root / "other-base"
    shutil.copytree(model, other)
    weights = transformers.LlavaForConditionalGeneration.from_pretrained(other)
    with torch.no_grad():
        weights.lm_head.weight.add_(1.0)
    weights.save_pretrained(other)
    return root / "trained", other


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


def run_command(app: str, argv: list[str], cli: bool, capsys) -> tuple[int, str]:
    if cli:
        proc = subprocess.run([sys.executable, "-m", app, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return proc.returncode, proc.stderr
    main = {"train": "train.__main__", "train.export": "train.export", "eval": "eval.__main__",
            "analysis": "analysis.__main__"}[app]
    capsys.readouterr()
    try:
        code = __import__(main, fromlist=["main"]).main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_with_its_own_message(case: Case, world, tiny_dir, bases, tmp_path, capsys):
    env = Env(world, tiny_dir("llava"), *bases, tmp_path / "case")
    env.dir.mkdir()
    argv = [str(a) for a in case.argv(env)]
    before = snapshot(env.dir)
    code, err = run_command(case.app, argv, case.cli, capsys)
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == case.code, err[-3000:]
    assert "error:" in message, err[-3000:]  # one line, the last thing said
    for needle in case.needles:
        assert needle.format(**vars(env)) in message, message
    assert snapshot(env.dir) == before  # nothing written, nothing half-written, nothing removed


def test_the_table_covers_every_class_of_input():
    kinds = {"data": "train", "row": "train", "turn": "train", "image": "train", "config": "train",
             "layer": "train", "resume": "train", "eval": "eval", "pairs": "analysis"}
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {k for k in kinds if any(c.id.startswith(k) for c in CASES)} == set(kinds)
    assert {c.app for c in CASES if c.cli} == {"train", "eval", "analysis"}
