"""The `semiseg` command as a package: every subcommand registered, ``python -m semiseg.cli`` and the console entry
point, and a subcommand that cannot be imported failing the command instead of vanishing from it."""
import os
import subprocess
import sys

from semiseg import cli

COMMANDS = ["train", "predict", "evaluate", "plan", "pseudolabel", "knowledge"]


def run_python(code: str, repo_dir) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(repo_dir / "SemiSegCore"))
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, cwd=repo_dir,
                          timeout=120)


def test_every_subcommand_is_registered():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS


def test_module_and_console_entry_point(repo_dir):
    done = run_python(["-m", "semiseg.cli", "--help"], repo_dir)
    assert done.returncode == 0, done.stderr
    assert "{" + ",".join(COMMANDS) + "}" in done.stdout
    assert 'semiseg = "semiseg.cli:main"' in (repo_dir / "SemiSegCore" / "pyproject.toml").read_text()
    assert cli.main.__module__ == "semiseg.cli"


def test_a_subcommand_that_cannot_be_imported_fails_the_command(repo_dir):
    # None in sys.modules makes `import semiseg.knowledge.cli` raise ImportError, as a broken module would
    code = "import sys; sys.modules['semiseg.knowledge.cli'] = None; from semiseg.cli import main; main(['--help'])"
    done = run_python(["-c", code], repo_dir)
    assert done.returncode != 0
    assert "import of semiseg.knowledge.cli halted" in done.stderr
