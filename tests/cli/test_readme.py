"""The README's two quick-start commands stay true."""

import re
import subprocess
import sys

from helpers import ROOT


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    demo, tests = quick_start_commands()
    assert demo.startswith("pip install torch==2.13.0") and demo.endswith("vlbridge demo")
    assert tests.startswith("pip install torch==2.13.0") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_cli_help_lists_demo():
    # The demo itself runs in tests/cli/test_cli.py (`vlbridge demo --fast`).
    result = subprocess.run([sys.executable, "-m", "vlbridge.cli", "--help"], capture_output=True, text=True)
    assert "demo" in result.stdout


def test_plain_install_has_what_the_demo_needs():
    """`pip install -e .` (no extras) must be enough for `vlbridge demo`: the scripts' packages and presets."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = {re.split(r"[<>=!~ ]", line.strip())[0] for line in config["options"]["install_requires"].splitlines()}
    assert {"torch", "transformers", "datasets", "trl", "peft", "evaluate", "matplotlib", "pyyaml"} <= required
    assert "presets/*.yaml" in config["options.package_data"]["vlbridge.scripts"]
    assert (ROOT / "vlbridge" / "scripts" / "presets" / "demo.yaml").is_file()
