"""The README's commands are the ones CI and users run: keep them true."""
import os
import re

from reference import ROOT


def readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    ci_lines = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [commands[1]]


def test_readme_names_files_and_configs_that_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in set(re.findall(r"`([\w./]+\.py)\b", readme)):
        assert any(os.path.exists(os.path.join(ROOT, d, name)) for d in ("", "configs")), name
