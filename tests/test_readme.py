"""The README's two quick-start commands stay true."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlbridge.cli import main, run_demo


ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    demo, tests = quick_start_commands()
    assert demo.startswith("pip install torch==2.13.0") and demo.endswith("vlbridge demo")
    assert tests.startswith("pip install torch==2.13.0") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_demo_command_runs_and_reports_every_bridge():
    rows = run_demo(["qformer", "perceiver", "mlp"], steps=3)
    assert [row["bridge"] for row in rows] == ["qformer", "perceiver", "mlp"]
    assert all(row["round_trip"] for row in rows)
    assert all(row["loss_end"] < row["loss_start"] for row in rows)


def test_demo_console_script(capsys):
    executable = shutil.which("vlbridge")
    if executable is None:
        pytest.skip("the vlbridge console script is not on PATH (package not pip-installed)")
    result = subprocess.run([executable, "demo", "--steps", "2", "--bridges", "mlp"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| mlp |" in result.stdout and "True" in result.stdout


def test_cli_rejects_unknown_bridge():
    with pytest.raises(SystemExit):
        main(["demo", "--bridges", "lstm"])


def test_cli_help_lists_demo():
    result = subprocess.run([sys.executable, "-m", "vlbridge.cli", "--help"], capture_output=True, text=True)
    assert "demo" in result.stdout
