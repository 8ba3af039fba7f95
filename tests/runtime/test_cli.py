"""The command line: --version, --help, and ``diagrams [--check]``."""

from __future__ import annotations

from pathlib import Path

import pytest

from steadysocket.runtime import diagrams
from steadysocket.runtime.cli import main


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("steadysocket 0.")


def test_diagrams_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["diagrams", "--help"])
    assert exit_info.value.code == 0
    assert "--check" in capsys.readouterr().out


def test_diagrams_writes_then_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagrams", "--root", str(tmp_path)]) == 0
    assert (tmp_path / diagrams.DOT_PATH).exists()
    assert main(["diagrams", "--check", "--root", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_diagrams_check_on_a_stale_tree_exits_one_with_the_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["diagrams", "--root", str(tmp_path)])
    mmd = tmp_path / diagrams.MERMAID_PATH
    mmd.write_text(mmd.read_text() + "    extra --> line\n")
    capsys.readouterr()
    assert main(["diagrams", "--check", "--root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "-    extra --> line" in captured.out
    assert "stale generated files: diagrams/lifecycle.mmd" in captured.err


def test_an_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", ["demo", "serve", "connect", "diagrams"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: steadysocket {command}" in capsys.readouterr().out
