"""The README's set-up commands are the ones CI runs and the ones the project's files support."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci_lines == [commands[1]]


def test_readme_commands_name_files_and_scripts_that_exist():
    text = (ROOT / "pyproject.toml").read_text()
    for command in _readme_commands():
        assert "-c constraints-cpu.txt" in command and (ROOT / "constraints-cpu.txt").is_file()
        if "myqasr " in command:
            assert 'myqasr = "torch_myqasr.cli:main"' in text
