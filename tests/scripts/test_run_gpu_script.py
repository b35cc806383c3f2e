"""benchmarks/run_gpu.sh stays runnable where no GPU can try it: valid bash, and every benchmark it calls exists and
accepts its flags (each through the script's own `make_parser`), `--peak-tflops` included."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


def benchmark_commands() -> list[list[str]]:
    """`[script, flag, ...]` of each `python3 benchmarks/X.py ...` line (continuations joined, the peak array
    dropped: it is empty unless PEAK_TFLOPS is set)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"python3 (benchmarks/\S+\.py.*)$", line)
        if match and not line.lstrip().startswith("#"):
            commands.append([word for word in shlex.split(match.group(1)) if "PEAK" not in word])
    return commands


def test_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_benchmark_accepts_its_flags():
    commands = benchmark_commands()
    names = [Path(words[0]).stem for words in commands]
    assert names == ["bench_stage1", "bench_generative", "bench_feature_cache"]
    for name, words in zip(names, commands):
        module = load_script(ROOT / words[0], name)
        try:
            parser = module.make_parser()
            peak = ["--peak-tflops", "989"] if any(a.dest == "peak_tflops" for a in parser._actions) else []
            assert parser.parse_args(words[1:] + peak).device == "cuda"
        finally:
            unload_script(name)
