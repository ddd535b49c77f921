"""The command-line conventions every stage and tool follows: `make help` lists every target, `--help`
names the command as it is run and shows the defaults, and a missing input names what makes it."""
import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, run_stage

COMMANDS = ["stages.download", "stages.preprocess", "stages.train", "stages.evaluate", "stages.export",
            "tools.predict", "tools.check", "tools.compare", "tools.sweep", "tools.flips", "tools.promote",
            "tools.champion"]


def test_make_help_lists_every_target():
    makefile = (REPO / "Makefile").read_text()
    targets = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    shown = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=clean_env()).stdout
    assert [t for t in targets if not re.search(rf"\bmake {re.escape(t)}\b", shown)] == []


@pytest.mark.parametrize("module", COMMANDS)
def test_help_names_the_command_and_its_defaults(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=clean_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m {module} ")
    assert "(default: False)" in result.stdout  # --debug, with every other option's default


def test_a_missing_model_names_the_commands_that_make_it(tmp_path):
    result = run_stage(tmp_path, "tools.predict", str(tmp_path / "any.png"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: models/model.pt not found: make it with `make run` (dvc repro), "
                                     "or fetch it with `dvc pull`")
