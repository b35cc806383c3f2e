"""The shell commands quoted in README.md and docs/*.md still parse: every flag exists and takes its value.

Guards the docs against drift from the code: a renamed or removed flag, a preset that is gone, a subcommand that
no longer exists, an example or benchmark script that moved. The commands come from ```bash blocks
(line continuations joined, `# comments` dropped, `&&` chains split) and from inline code spans that start with
`vlbridge `, `python examples/`, `python benchmarks/`, `accelerate launch` or `torchrun`. Each is parsed the way
the program parses it, without running anything (no training, no model):

* `vlbridge <command> ...`: a training command's flags go, with its `--config` preset (the command's default one
  when none is given), through its script's `make_parser().parse_args_and_config` (TRL's `TrlParser`), and nothing
  may be left over; any other command through `vlbridge.cli.build_parser()`. `vlbridge demo`'s `--<section>.<key>`
  overrides go through `parse_overrides` and `load_demo_config`, and each stage's resulting settings through that
  stage's script parser;
* `python examples/X.py ...`, `accelerate launch ... examples/X.py ...`, `torchrun ... examples/X.py ...`: the
  launcher's own flags through its parser (accelerate's `launch_command_parser`, torch's `get_args_parser`), the
  script must exist, and its flags go through its `make_parser()`;
* `python benchmarks/X.py ...`: the script exists and its `make_parser()` accepts the flags.

A command with a placeholder (`<path>`, `...`, or alternatives `a / b`) is skipped, but counted, and its program (the
`vlbridge` command, the script) must still exist; so must the command of a bare `vlbridge <command>` that names, in
prose, a command with required arguments (`vlbridge caption` captions images...). A failure lists every command of
the doc that does not parse, with its line and argparse's error.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
# An inline code span: single backticks, within one paragraph (it may wrap onto the next line).
INLINE_SPAN = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\s*\n))+)`(?!`)")
PLACEHOLDER = re.compile(r"<[^<>]+>|\.\.\.|…")


@dataclass
class Quoted:
    """A command quoted in a doc: where it starts, and its words (one command of an `&&` chain)."""

    line: int
    words: list[str]

    @property
    def text(self) -> str:
        return shlex.join(self.words)


def _commands_of(words: list[str]) -> list[list[str]]:
    """The vlbridge / python / launcher commands in `words` (a shell line split by shlex), without env assignments."""
    commands, current = [], []
    for word in [*words, "&&"]:
        if word not in OPERATORS:
            current.append(word)
            continue
        while current and re.match(r"^[A-Za-z_]\w*=", current[0]):  # OMP_NUM_THREADS=1 python ...
            current.pop(0)
        program = current[:1]
        script = current[1] if len(current) > 1 else ""
        if (
            (program == ["vlbridge"] and len(current) > 1)
            or (program in (["python"], ["python3"]) and script.startswith(("examples/", "benchmarks/")))
            or current[:2] == ["accelerate", "launch"]
            or (program == ["torchrun"] and len(current) > 1)
        ):
            commands.append(current)
        current = []
    return commands


def quoted_commands(markdown: str) -> tuple[list[Quoted], list[tuple[int, str]]]:
    """
    The commands `markdown` quotes: in shell code blocks (continuation lines joined, comments dropped) and in inline
    code spans outside code blocks. Returns them and the quotes shlex cannot split, as `(line, text)`.
    """
    lines = markdown.splitlines()
    prose = list(lines)  # the text outside code blocks, code blocks blanked so that line numbers stay
    logical = []  # (first line, joined text) of each shell line
    fence, shell, pending = None, False, None
    for number, line in enumerate(lines, start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence, shell = opening.group(1), opening.group(2).lower() in SHELL_FENCES
            prose[number - 1] = ""
            continue
        if fence is not None:
            prose[number - 1] = ""
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
                continue
            if shell:
                start, text = pending or (number, "")
                text += line.rstrip()
                if text.endswith("\\"):
                    pending = (start, text[:-1] + " ")
                else:
                    pending = None
                    logical.append((start, text))
    text = "\n".join(prose)
    for match in INLINE_SPAN.finditer(text):
        logical.append((text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())))

    commands, unsplittable = [], []
    for number, line in sorted(logical):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            unsplittable.append((number, line))
            continue
        commands += [Quoted(number, command) for command in _commands_of(words)]
    return commands, unsplittable


def has_placeholder(words: list[str]) -> bool:
    """`<path>`, `...` or alternatives (`vlbridge stage2 / sft`): not a command to run as it is."""
    return any(PLACEHOLDER.search(word) or word == "/" for word in words)


class ParseError(Exception):
    pass


@contextlib.contextmanager
def argparse_errors():
    """argparse's `error()` prints the usage and exits: turns that into a `ParseError` holding the message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as stop:
        if stop.code not in (0, None):  # 0: --help / --version, which parse fine
            message = [line for line in stderr.getvalue().splitlines() if line.strip()]
            raise ParseError(message[-1] if message else f"exit status {stop.code}") from None


def parse_script_flags(parser, argv: list[str]) -> None:
    """
    `argv` as a training script's `make_parser().parse_args_and_config(argv)` takes it (TRL's `TrlParser`: the
    `--config` preset gives the defaults, an unknown key in it is an error), without building the dataclasses (no
    `__post_init__`, which checks the machine: `--bf16 true` is fine on a GPU); an unknown flag is left over.
    """
    for at, arg in enumerate(argv):
        # `--config path/to.yaml` falls back to the shipped preset of that name: a quoted path must be a file
        config = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[at + 1] if arg == "--config" else None
        if config is not None and "/" in config and not (ROOT / config).is_file():
            raise ParseError(f"--config {config} does not exist")
    left_over = []

    def parse_only(args=None, **kwargs):
        left_over.extend(parser.parse_known_args(args)[1])
        return ()

    parser.parse_args_into_dataclasses = parse_only
    with argparse_errors():
        try:
            parser.parse_args_and_config(argv)
        except (ValueError, FileNotFoundError) as error:
            raise ParseError(str(error)) from None
    if left_over:
        raise ParseError(f"unrecognized arguments: {' '.join(left_over)}")


def check_vlbridge(argv: list[str]) -> None:
    """`vlbridge <argv>` parses, as `vlbridge.cli.main` parses it."""
    from vlbridge import cli

    argv = [arg for arg in argv if arg != "--debug"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the deprecation line of an earlier command name
            argv = cli._deprecated(argv)
    except ValueError as error:
        raise ParseError(str(error)) from None
    if argv and argv[0] in cli.TRAINING_COMMANDS:
        rest = argv[1:]
        if not any(arg == "--config" or arg.startswith("--config=") for arg in rest):
            rest = ["--config", cli.TRAINING_COMMANDS[argv[0]][0], *rest]
        parse_script_flags(importlib.import_module(f"vlbridge.scripts.{argv[0]}").make_parser(), rest)
        return
    if argv and argv[0] in cli.SCRIPT_COMMANDS:
        script = importlib.import_module(f"vlbridge.scripts.{cli.script_module(argv[0])}")
        parse_script_flags(script.make_parser(), argv[1:])
        return
    parser = cli.build_parser()
    with argparse_errors():
        if argv and argv[0] in cli.INFERENCE_COMMANDS:
            cli._apply_yaml_config(parser.commands[argv[0]], argv[0], argv)
        args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        import yaml

        from vlbridge.demo.demo import STAGES, load_demo_config, parse_overrides

        try:
            stages, _ = load_demo_config(args.config, args.fast, parse_overrides(rest))
        except (ValueError, FileNotFoundError) as error:
            raise ParseError(str(error)) from None
        for stage, settings in stages.items():
            with tempfile.TemporaryDirectory() as folder:
                preset = Path(folder) / f"{stage}.yaml"
                preset.write_text(yaml.safe_dump(settings))
                try:
                    script = importlib.import_module(f"vlbridge.scripts.{STAGES[stage][0]}")
                    parse_script_flags(script.make_parser(), ["--config", str(preset)])
                except ParseError as error:
                    raise ParseError(f"demo stage {stage}: {error}") from None
    elif rest:
        raise ParseError(f"unrecognized arguments: {' '.join(rest)}")


def check_script(path: str, argv: list[str]) -> None:
    """`python <path> <argv>`: the script exists, and its `make_parser()` takes argv."""
    script = ROOT / path
    if not script.is_file():
        raise ParseError(f"{path} does not exist")
    name = f"_docs_{script.parent.name}_{script.stem}"
    try:
        module = load_script(script, name)
        make_parser = getattr(module, "make_parser", None)
        if make_parser is None:
            return
        parser = make_parser()
        if hasattr(parser, "parse_args_and_config"):  # a training script (examples/): presets, dataclasses
            parse_script_flags(parser, argv)
            return
        with argparse_errors():
            _, rest = parser.parse_known_args(argv)
        if rest:
            raise ParseError(f"unrecognized arguments: {' '.join(rest)}")
    finally:
        unload_script(name)


def launched_script(words: list[str]) -> tuple[str, list[str]]:
    """The script and its arguments of a `python` / `accelerate launch` / `torchrun` command; the launcher's own flags
    go through its parser, and its `--config_file` must exist."""
    if words[0].startswith("python"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        with argparse_errors():
            launch = get_args_parser().parse_args(words[1:])
    else:
        from accelerate.commands.launch import launch_command_parser

        with argparse_errors():
            launch = launch_command_parser().parse_args(words[2:])
        if launch.config_file and not (ROOT / launch.config_file).is_file():
            raise ParseError(f"--config_file {launch.config_file} does not exist")
    return launch.training_script, launch.training_script_args


def check_program(words: list[str]) -> None:
    """For a command with a placeholder: only that its `vlbridge` command or its script exists."""
    if words[0] == "vlbridge":
        from vlbridge import cli

        command = next((word for word in words[1:] if not word.startswith("-")), None)
        # `vlbridge pretrain` and `vlbridge train --stage <name>`: earlier names, still accepted with a warning
        if command not in {*cli.build_parser().commands, *cli.RENAMED_COMMANDS, "train"}:
            raise ParseError(f"no command {command!r}")
        return
    script = next((word for word in words[1:] if word.endswith(".py")), None)
    if script is None or not (ROOT / script).is_file():
        raise ParseError(f"{script} does not exist")


def check(quoted: Quoted) -> tuple[str, str | None]:
    """
    How `quoted` was checked and its error (None when fine): `"parsed"`; `"skipped"` for a placeholder, when only its
    program must exist; `"named"` for a bare `vlbridge <command>` that names a command taking required arguments in
    prose (`vlbridge caption` captions images...), when only the command must exist.
    """
    status = "skipped" if has_placeholder(quoted.words) else "parsed"
    try:
        if status == "skipped":
            check_program(quoted.words)
        elif quoted.words[0] == "vlbridge":
            try:
                check_vlbridge(quoted.words[1:])
            except ParseError as error:
                if len(quoted.words) > 2 or "the following arguments are required" not in str(error):
                    raise
                status = "named"
                check_program(quoted.words)
        else:
            check_script(*launched_script(quoted.words))
    except (ParseError, FileNotFoundError) as error:
        return status, str(error)
    return status, None


def test_quoted_commands_are_found():
    """The extraction itself, on a made-up doc: continuations, comments, chains, env vars, spans, placeholders."""
    markdown = (
        "Run `vlbridge eval outputs/sft --num_images\n10` or `vlbridge` alone, not `pip install x`.\n\n"
        "```bash\n"
        "# a comment\n"
        "pip install -e . && vlbridge demo --fast  # the demo\n"
        "OMP_NUM_THREADS=1 python benchmarks/bench_qformer.py \\\n"
        "    --repeats 3\n"
        "python -m pytest -q tests\n"
        "```\n\n"
        "```python\nvlbridge_model = 'vlbridge caption'\n```\n"
        "`accelerate launch --config_file a.yaml examples/sft.py ...`\n"
    )
    found, unsplittable = quoted_commands(markdown)
    assert [(quoted.line, quoted.text) for quoted in found] == [
        (1, "vlbridge eval outputs/sft --num_images 10"),
        (6, "vlbridge demo --fast"),
        (7, "python benchmarks/bench_qformer.py --repeats 3"),
        (15, "accelerate launch --config_file a.yaml examples/sft.py ..."),
    ]
    assert unsplittable == []
    assert [has_placeholder(quoted.words) for quoted in found] == [False, False, False, True]


def test_checks_catch_a_bad_flag_and_a_missing_preset(monkeypatch):
    monkeypatch.chdir(ROOT)

    def check_line(line: str) -> tuple[str, str | None]:
        return check(Quoted(1, shlex.split(line)))

    assert check_line("vlbridge stage1 --max_steps 5") == ("parsed", None)
    assert check_line("vlbridge caption") == ("named", None)  # prose naming the command
    assert check_line("vlbridge caption <checkpoint> a.png") == ("skipped", None)
    assert check_line("vlbridge nope ...") == ("skipped", "no command 'nope'")
    assert "arguments are required" in check_line("vlbridge caption --max_new_tokens 3")[1]
    assert "--no_such_flag" in check_line("vlbridge sft --no_such_flag 1")[1]
    assert "invalid int value" in check_line("vlbridge dpo --max_steps many")[1]
    assert "no_such_preset" in check_line("vlbridge dpo --config no_such_preset")[1]
    assert "invalid choice" in check_line("vlbridge stage3 --max_steps 5")[1]
    assert "--no_such_key" in check_line("vlbridge demo --stage1.no_such_key 1")[1]
    assert "does not exist" in check_line("python examples/no_such_script.py")[1]
    assert "--nope" in check_line("python examples/sft.py --config sft_builtin --nope 1")[1]
    assert "does not exist" in check_line("python examples/sft.py --config examples/gone/sft_builtin.yaml")[1]
    launch = "accelerate launch --config_file examples/accelerate/ddp.yaml"
    assert "--nope" in check_line(f"{launch} examples/sft.py --config sft_builtin --nope 1")[1]
    assert "--num_processes" in check_line(f"{launch} --num_processes two examples/sft.py")[1]
    assert "does not exist" in check_line("accelerate launch --config_file nope.yaml examples/sft.py")[1]
    assert "--nope" in check_line("python benchmarks/bench_qformer.py --nope")[1]


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_quoted_commands_parse(doc, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths (examples/configs/...) are relative to the repository
    found, unsplittable = quoted_commands(doc.read_text())
    where = doc.relative_to(ROOT)
    bad = [f"{where}:{line}: {text}: shlex cannot split it" for line, text in unsplittable]
    for quoted in found:
        _, error = check(quoted)
        if error is not None:
            bad.append(f"{where}:{quoted.line}: {quoted.text}\n    -> {error}")
    assert not bad, f"{len(bad)} of the {len(found)} commands quoted in {where} do not parse:\n" + "\n".join(bad)
