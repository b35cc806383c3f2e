"""The supported dependency window is declared once (setup.cfg) and tested at both ends.

CI (.ci/run) runs the whole suite twice: in an environment resolved the way the README installs (the newest releases),
and in one constrained by .ci/floor-constraints.txt (every runtime dependency at its lower bound). These tests keep
the floor file, setup.cfg and the CI script in step, so the floor that CI tests is the floor that users are promised.
"""

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


ROOT = Path(__file__).resolve().parents[1]
FLOOR = ROOT / ".ci" / "floor-constraints.txt"
# CI's machine holds one CPU build of torch; any other release pulls several GB of CUDA wheels. Both environments
# therefore run torch 2.13.0, and torch's own lower bound is the one bound that CI does not reach.
UNTESTED_FLOORS = {"torch"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    requirements = [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {_canonical(requirement.name): requirement for requirement in requirements}


def floor_pins() -> dict[str, Version]:
    pins = {}
    for line in FLOOR.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"{FLOOR.name}: {line!r} is not an exact pin (name==version)"
            pins[_canonical(name)] = Version(pinned)
    return pins


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def test_every_runtime_dependency_has_a_lower_bound_and_a_floor_pin():
    requirements, pins = runtime_requirements(), floor_pins()
    unbounded = sorted(name for name, requirement in requirements.items() if lower_bound(requirement) is None)
    assert not unbounded, f"setup.cfg: give these a lower bound (>=), so the floor CI tests is declared: {unbounded}"
    assert set(pins) == set(requirements), (
        f"{FLOOR.name} must pin exactly setup.cfg's runtime dependencies; missing "
        f"{sorted(set(requirements) - set(pins))}, extra {sorted(set(pins) - set(requirements))}"
    )


def test_floor_pins_equal_the_lower_bounds_of_setup_cfg():
    requirements, pins = runtime_requirements(), floor_pins()
    mismatched = {
        name: (str(lower_bound(requirement)), str(pins[name]))
        for name, requirement in requirements.items()
        if name not in UNTESTED_FLOORS and lower_bound(requirement) != pins.get(name)
    }
    assert not mismatched, f"(setup.cfg lower bound, {FLOOR.name} pin) disagree: {mismatched}"
    for name, requirement in requirements.items():
        assert pins[name] in requirement.specifier, f"{FLOOR.name} pins {name} {pins[name]} outside {requirement}"


# The parity tests' reference: OpenFlamingo's modules. The package pins torch 2.0.1 (and open_clip), so it cannot be a
# requirement of the `test` extra; both environments install it beside, without its dependencies (einops is in the
# extra). Pinned, so that the reference does not move under the tests.
REFERENCE = "pip install --no-deps open-flamingo==2.0.1 einops-exts==0.0.4"


def test_ci_runs_the_suite_at_both_ends_of_the_window():
    script = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    newest = f'pip install torch==2.13.0 && pip install -e ".[test]" && {REFERENCE} && python -m pytest -q tests'
    floor = (
        'pip install torch==2.13.0 && pip install -c .ci/floor-constraints.txt -e ".[test]" && '
        f"{REFERENCE} && python -m pytest -q tests"
    )
    assert newest in script and newest in readme
    assert floor in script, "CI must run the suite in the floor environment too"
    assert floor in readme, "the README quotes the floor command CI runs"


def test_every_test_install_in_the_readme_installs_the_reference():
    """A reader who installs the test extra the README's way gets the OpenFlamingo parity tests run, not skipped."""
    readme = (ROOT / "README.md").read_text()
    installs = [line for line in readme.splitlines() if '-e ".[test]"' in line]
    assert len(installs) >= 3, installs
    missing = [line for line in installs if REFERENCE not in line]
    assert not missing, f"README lines that install the test extra without `{REFERENCE}`: {missing}"


def test_the_reference_dependency_is_in_the_test_extra_and_not_a_runtime_one():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    test_extra = [line.strip() for line in config["options.extras_require"]["test"].splitlines()]
    assert any(_canonical(Requirement(line).name) == "einops" for line in test_extra if line and line[0] != "#")
    assert "einops" not in runtime_requirements() and "einops" not in floor_pins()
