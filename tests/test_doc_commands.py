"""Every command in README.md and docs/*.md runs as written (issue 31 item 11).

The shell commands of the fenced code blocks (and the inline `python -m keras_seg...` / `python tools/...`
spans with arguments) are extracted, and each keras_seg or tools command runs in this process, as
written, against a tiny real run and tiny real data, up to the first heavy step, which is stubbed to stop
it there: the model load (`evaluate`, `predict`, `export`), the trainer, the conversion, the page drawing,
a benchmark's work. Everything before it runs for real: argument parsing (every flag must exist, every
required flag be given) and the command's own checks (files exist, flags that go together, outputs it
would not overwrite). A command that stops with an error before the heavy step fails with its doc file
and line.

Where a doc names a place (runs/pairs, data/pairs, ~/data/..., /scratch/...), the command runs in an empty
folder in which that place holds what the doc's flow puts there, by the flag's role (`ROLES`): a run
directory (tests/tiny_run.py), TFRecords (8 demo scenes), an export, photos, the raw datasets of
../shared/data, or nothing for what the command writes. `~` is that folder's home/, an absolute path
lies inside it. Synopses (`[overrides]`, `...`) are checked at the flag level only; an optional
`[--flag VALUE]` runs both without and with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import re
import runpy
import shlex
import shutil
import signal
import sys

import cv2
import numpy as np
import pytest

from test_train import make_config, tiny_data  # noqa: F401 (fixture)
from tiny_run import write_run

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
PROGRAM = re.compile(r"^(?:-m (keras_seg\.\w+)|(tools/\w+\.py))$")

# What a flag's value must be for the command to find it: "data" TFRecords, "run" a run directory,
# "resumable" a run with checkpoints, "model" a run or an export (`MODELS`), "photos" images, "masks" a
# folder, "raw" the source dataset as downloaded (`RAW`), "weights" an encoder weights file, "folder" any
# folder, "new" nothing (the command writes it; its parent exists). None: the positional arguments.
ROLES = {
    "keras_seg.train": {"--data": "data", "--output": "new", "--init-from": "run", "--cache": "new",
                        "--encoder-weights": "weights"},
    "keras_seg.evaluate": {"--model": "model", "--data": "data", "--output": "new", "--report": "new"},
    "keras_seg.predict": {"--model": "model", "--input": "photos", "--output": "new", "--gt": "masks"},
    "keras_seg.export": {"--run": "run", "--output": "new", "--calibration-data": "data"},
    "keras_seg.report": {None: "run", "-o": "new", "--output": "new"},
    "tools/make_tfrecords.py": {"--input": "raw", "--output": "new", "--manual-dir": "folder", "--data-dir": "folder"},
}
# --model by the doc's path: what the doc's own flow left there.
MODELS = [
    (r"\.(tflite|onnx|xml)$", "artifact"),  # export --format litert|onnx|openvino: the file, beside labels.json
    (r"^models/int8$", "litert folder"),  # docs/report.md: a LiteRT int8 export's folder (issue 31 item 11)
    (r"^models/", "saved model"),  # export --output models: models/NAME/VERSION/saved_model.pb
    (r"", "run"),
]
# make_tfrecords SOURCE --input: the sample of that source in ../shared/data.
RAW = {"cityscapes": "cityscapes_official_sample", "voc": "voc2012_sample/VOCdevkit",
       "cityscapes-pairs": "cityscapes_pairs", "folder": "voc_color_masks"}
# Placeholder values of optional [--flag VALUE] groups.
VALUES = {"N": "2"}


class Reached(BaseException):
    """The command got to its heavy step (a BaseException: no `except Exception` of the command holds it)."""


@dataclasses.dataclass
class DocCommand:
    where: str  # doc file:line
    text: str  # the command as written (continuations joined)
    env: dict
    program: str  # "keras_seg.train", "tools/make_tfrecords.py", ...
    args: list

    @property
    def synopsis(self) -> bool:
        """`[overrides]`, `RUN [RUN ...]`: a usage line, not a command to run."""
        return any("..." in a for a in self.args) or any(a.startswith("[") and not a.startswith("[-")
                                                          for a in self.args)

    def variants(self) -> list:
        """The arguments without and with each optional `[--flag VALUE]` group."""
        if not any(a.startswith("[") for a in self.args):
            return [self.args]
        without, with_all, inside = [], [], False
        for arg in self.args:
            opening, closing = arg.startswith("["), arg.endswith("]")
            bare = arg.lstrip("[").rstrip("]")
            if opening or inside:
                with_all.append(VALUES.get(bare, bare))
            else:
                without.append(arg)
                with_all.append(arg)
            inside = (inside or opening) and not closing
        return [without, with_all]


def split_segments(text):
    """Shell words of `text` (comments dropped), cut at &&, ||, ;, |."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segment = []
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            yield segment
            segment = []
        else:
            segment.append(word)
    yield segment


def commands_in(text, where) -> list:
    found = []
    for words in split_segments(text):
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        # `docker run ... IMAGE python -m keras_seg.train ...`: the command inside counts.
        for i, word in enumerate(words[:-1]):
            if word in ("python", "python3"):
                head = words[i + 1] if words[i + 1] != "-m" else f"-m {words[i + 2] if i + 2 < len(words) else ''}"
                match = PROGRAM.match(head)
                if match:
                    rest = words[i + (3 if head.startswith("-m ") else 2):]
                    found.append(DocCommand(where, text, env, match[1] or match[2], rest))
                break
    return found


def doc_commands() -> list:
    commands = []
    for path in DOCS:
        name = path.relative_to(REPO).as_posix()
        lines = path.read_text().splitlines()
        fence, i = None, 0
        while i < len(lines):
            line = lines[i]
            marker = re.match(r"\s*```(\S*)", line)
            if marker:
                fence = None if fence is not None else marker[1]
                i += 1
                continue
            start = i
            if fence is not None and fence in SHELL_FENCES:
                while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                text = " ".join(part.rstrip().rstrip("\\") for part in lines[start:i + 1])
                commands += commands_in(text, f"{name}:{start + 1}")
            elif fence is None:
                for span in re.findall(r"`(python3? (?:-m keras_seg|tools/)[^`]*)`", line):
                    commands += [c for c in commands_in(span, f"{name}:{start + 1}") if c.args]
            i += 1
    return commands


COMMANDS = doc_commands()


# ----------------------------------------------------------------------- parsers and roles


def capture_parser(command: DocCommand) -> argparse.ArgumentParser:
    """The program's argparse parser, as its main builds it (caught at parse_args)."""
    caught = []

    def catch(parser, *args, **kwargs):
        caught.append(parser)
        raise Reached("parse")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        patch.setattr(sys, "argv", [command.program, "--help"])
        try:
            run_program(command.program, ["--help"])
        except Reached:
            pass
    assert caught, f"{command.program}: no argparse parser found"
    return caught[0]


def subparsers(parser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_actions(parser, args) -> dict:
    """Option string -> action, of the subcommand named in `args` (or of every subcommand: SOURCE)."""
    options = dict(parser._option_string_actions)
    subs = subparsers(parser)
    named = [subs[a] for a in args if a in subs]
    for sub in named or subs.values():
        options.update(sub._option_string_actions)
    return options


def roles_of(command, args, parser) -> list:
    """(index in args, role) of every value the command names, by the flag it follows."""
    roles, table = [], ROLES.get(command.program, {})
    options = option_actions(parser, args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg in options:
            action = options[arg]
            count = {None: 1, "?": 1, "+": len(args), "*": len(args)}.get(action.nargs, action.nargs)
            j = i + 1
            while j < len(args) and j <= i + count and not args[j].startswith("-"):
                role = table.get(arg)
                if arg == "--output" and command.program == "keras_seg.train" and "--resume" in args:
                    role = "resumable"
                if role:
                    roles.append((j, role))
                j += 1
            i = j
        else:
            if not arg.startswith("-") and table.get(None) and arg not in subparsers(parser):
                roles.append((i, table[None]))
            i += 1
    return roles


def check_flags(command, args, parser):
    """Every --flag of the command is one of the program's options (exactly: no abbreviation)."""
    options = option_actions(parser, args)
    unknown = [a for a in args if re.match(r"-{1,2}[a-zA-Z]", a) and a.lstrip("[").rstrip("]") not in options]
    assert not unknown, f"{command.where}: {command.program} has no option {', '.join(unknown)}\n  {command.text}"


# ----------------------------------------------------------------------- the places a doc names


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("doc-run") / "run")


@pytest.fixture(scope="module")
def resumable_run(tiny_data, tmp_path_factory):  # noqa: F811
    """A run directory as an interrupted training leaves it: its config.json (as resolved) and checkpoints/."""
    run = tmp_path_factory.mktemp("doc-resume") / "run"
    config = make_config(tiny_data, run, "--iters", "6")
    config.resolved = {"total_steps": 6, "precision": "float32"}
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copy(os.path.join(tiny_data, "dataset_info.json"), run / "dataset_info.json")
    return str(run)


class Workspace:
    """An empty folder in which the doc's places hold what its flow puts there."""

    def __init__(self, root, data, run, resumable):
        self.cwd = root / "work"
        self.cwd.mkdir(parents=True)
        self.data, self.run, self.resumable = data, run, resumable
        if SHARED_DATA.is_dir():  # ../shared/data, as a doc run from the checkout names it
            (root / "shared").mkdir()
            (root / "shared" / "data").symlink_to(SHARED_DATA)

    def path(self, written) -> pathlib.Path:
        if written.startswith("~/"):
            return self.cwd / "home" / written[2:]
        if written.startswith("/"):
            return self.cwd / written.lstrip("/")
        return self.cwd / written

    def place(self, written, role, source=None) -> str:
        """Makes `written` hold what `role` needs; returns the argument to pass."""
        if role == "weights" and written in ("imagenet", "none"):
            return written
        path = self.path(written)
        if os.path.lexists(path):
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if role == "model":
            role = next(kind for pattern, kind in MODELS if re.search(pattern, written.rstrip("/")))
        if role in ("data", "run", "resumable"):
            path.symlink_to({"data": self.data, "run": self.run, "resumable": self.resumable}[role])
        elif role == "raw":
            if not SHARED_DATA.is_dir():
                pytest.skip("../shared/data is not present (the raw datasets)")
            if source not in RAW:
                pytest.fail(f"{written}: no sample of make_tfrecords source {source!r} in RAW")
            path.symlink_to(SHARED_DATA / RAW[source])
        elif role == "artifact":
            path.write_bytes(b"")  # never read: the runtime's load is where the run stops
            (path.parent / "labels.json").write_text("{}")
        elif role == "litert folder":
            path.mkdir()
            (path / "model.tflite").write_bytes(b"")
            (path / "labels.json").write_text("{}")
        elif role == "saved model":
            (path / "1").mkdir(parents=True)
            (path / "1" / "saved_model.pb").write_bytes(b"")
        elif role == "photos":
            image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                cv2.imwrite(str(path), image)
            else:
                path.mkdir()
                cv2.imwrite(str(path / "photo.png"), image)
        elif role in ("masks", "folder"):
            path.mkdir()
        elif role == "weights":
            path.write_bytes(b"")  # resolved (it exists, it is .h5), not loaded: no encoder is built here
        elif role != "new":
            raise ValueError(role)
        return str(path)


# ----------------------------------------------------------------------- running a command to its heavy step


def run_program(program, args):
    """The program's main, as `python -m` / `python tools/...` runs it, in this process."""
    if program.startswith("tools/"):
        saved = sys.argv
        sys.argv = [str(REPO / program), *args]
        try:
            runpy.run_path(str(REPO / program), run_name="__main__")
        finally:
            sys.argv = saved
        return 0
    module = importlib.import_module(program if program != "keras_seg.report" else "keras_seg.report.__main__")
    return module.main(args)


def stop_at_heavy_steps(patch, program, tiny_data_dir, home):
    def reached(what):
        def stop(*args, **kwargs):
            raise Reached(what)
        return stop

    import keras

    from keras_seg import demo, inference, runtimes
    from keras_seg import report as report_package
    from keras_seg.models import encoders

    patch.setattr(importlib.import_module("keras_seg.training.trainer"), "Trainer", reached("training"))
    patch.setattr(demo, "write_demo_dataset", lambda *args, **kwargs: tiny_data_dir)

    def download(name, *args, **kwargs):  # keras.utils.get_file: no network here
        path = home / ".keras" / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)

    patch.setattr(keras.utils, "get_file", download)
    # Resolved as training resolves them (the file exists, it is .h5); not loaded into a built encoder.
    patch.setattr(encoders, "check_encoder_weights", lambda encoder, weights: encoders.resolve_weights(encoder,
                                                                                                       weights))
    for name in ("load_run_model", "load_saved_model"):
        patch.setattr(inference, name, reached("loading the model"))
    patch.setattr(runtimes, "artifact_segmenter", reached("loading the model"))
    for name in ("write_run_report", "write_comparison"):
        patch.setattr(report_package, name, reached("drawing the page"))
    if program == "tools/make_tfrecords.py":
        patch.syspath_prepend(str(REPO))
        import pipelines.convert
        import pipelines.tfds_source

        patch.setattr(pipelines.convert, "convert", reached("converting"))
        # TFDS builds the whole dataset from the archives in --manual-dir before the conversion starts.
        patch.setattr(pipelines.tfds_source.TfdsSource, "_prepare", reached("preparing the TFDS dataset"))
    elif program.startswith("tools/"):  # a benchmark: its parsing only
        real_parse = argparse.ArgumentParser.parse_args

        def parse_then_stop(parser, *args, **kwargs):
            real_parse(parser, *args, **kwargs)
            raise Reached("benchmarking")

        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def run_as_written(command, args, workspace, tiny_data_dir, capsys):
    """Runs the command (its places made) to its heavy step; fails with the doc's file and line if it stops
    before, with what it said."""
    parser = capture_parser(command)
    check_flags(command, args, parser)
    args = list(args)
    source = next((a for a in args if a in RAW or a == "tfds"), None)
    for index, role in roles_of(command, args, parser):
        args[index] = workspace.place(args[index], role, source)
    sigterm = signal.getsignal(signal.SIGTERM)  # train's main installs its own
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace.cwd)
        patch.setenv("HOME", str(workspace.cwd / "home"))
        for key, value in command.env.items():
            patch.setenv(key, value)
        stop_at_heavy_steps(patch, command.program, tiny_data_dir, workspace.cwd / "home")
        capsys.readouterr()
        reached = None
        try:
            code = run_program(command.program, args)
        except Reached as stop:
            code, reached = 0, str(stop)
        except SystemExit as stopped:
            code = stopped.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    said = capsys.readouterr()
    assert code in (0, None), (f"{command.where}: the command as written stops with exit code {code}:\n"
                               f"  {command.text}\n  {(said.err or said.out).strip()[-600:]}")
    assert reached, f"{command.where}: ended without reaching its heavy step (exit {code}): {command.text}"
    return reached


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.program}" for c in COMMANDS])
def test_a_doc_command_runs_as_written(command, tiny_data, tiny_run_dir, resumable_run, tmp_path,  # noqa: F811
                                       capsys):
    if command.synopsis:
        check_flags(command, command.args, capture_parser(command))
        return
    for n, args in enumerate(command.variants()):
        workspace = Workspace(tmp_path / str(n), tiny_data, tiny_run_dir, resumable_run)
        run_as_written(command, args, workspace, tiny_data, capsys)


def test_the_command_export_prints_runs_as_written(tiny_data, tiny_run_dir, resumable_run, tmp_path,  # noqa: F811
                                                  capsys, monkeypatch):
    """A LiteRT / ONNX / OpenVINO export ends printing how to score it: that command runs as written too (its
    DIR, the data to score on)."""
    from keras_seg import export

    workspace = Workspace(tmp_path, tiny_data, tiny_run_dir, resumable_run)
    artifact = workspace.path("deploy/model.tflite")
    monkeypatch.setattr(export, "export_artifact", lambda *args, **kwargs: str(artifact))
    assert export.main(["--run", tiny_run_dir, "--format", "litert", "--output", str(artifact.parent)]) == 0
    printed = capsys.readouterr().out
    hints = [c for line in printed.splitlines() for c in commands_in(line, "printed by keras_seg.export")]
    assert [c.program for c in hints] == ["keras_seg.evaluate"], printed
    run_as_written(hints[0], hints[0].args, workspace, tiny_data, capsys)


def test_the_docs_hold_the_commands_this_checks():
    """The extraction finds the docs' commands: each program the docs use, in the files that show it."""
    found = {(c.where.split(":")[0], c.program) for c in COMMANDS}
    for expected in [("README.md", "keras_seg.train"), ("README.md", "keras_seg.evaluate"),
                     ("README.md", "keras_seg.predict"), ("README.md", "keras_seg.export"),
                     ("README.md", "tools/make_tfrecords.py"), ("docs/deploy.md", "keras_seg.evaluate"),
                     ("docs/report.md", "keras_seg.report"), ("docs/training.md", "keras_seg.train"),
                     ("docs/performance.md", "tools/bench_inference.py"), ("docs/data.md", "tools/make_tfrecords.py")]:
        assert expected in found, expected
    multiworker = next(c for c in COMMANDS if "TF_CONFIG" in c.env)
    assert multiworker.program == "keras_seg.train" and "--strategy" in multiworker.args
    docker = next(c for c in COMMANDS if c.text.lstrip().startswith("docker run --gpus"))
    assert docker.args[:2] == ["--preset", "unet_silu"]


def test_the_check_fails_on_a_wrong_command(tiny_data, tiny_run_dir, resumable_run, tmp_path, capsys):  # noqa: F811
    """A flag that does not exist, a required flag left out, an exported model without --output and a
    place that is missing each fail, naming the doc line."""
    cases = {
        "has no option --epoch": "python -m keras_seg.train --preset unet_small --data data/pairs --epoch 3",
        "required: --output": "python -m keras_seg.export --run runs/pairs",
        "--output DIR is needed": "python -m keras_seg.evaluate --model deploy/int8/model.tflite --data data/pairs",
        "no such file": "python -m keras_seg.train --preset unet_mobilenetv3 --data data/pairs --encoder-weights "
                        "~/w.h5",
    }
    class WithoutWeights(Workspace):
        def place(self, written, role, source=None):  # the weights file named is not there: nothing makes it
            return str(self.path(written)) if role == "weights" else super().place(written, role, source)

    for n, (why, text) in enumerate(cases.items()):
        [command] = commands_in(text, "made-up.md:7")
        workspace = (WithoutWeights if why == "no such file" else Workspace)(tmp_path / str(n), tiny_data,
                                                                            tiny_run_dir, resumable_run)
        with pytest.raises(AssertionError, match=re.escape(why)) as failed:
            run_as_written(command, command.args, workspace, tiny_data, capsys)
        assert "made-up.md:7" in str(failed.value)
