"""slmkit.errors.run_command: what every entry point (slm, python -m slmkit.train) prints when a
command raises."""

from __future__ import annotations

import errno

import pytest

from slmkit.errors import SlmError, run_command


def raising(exc: BaseException):
    def run() -> int:
        raise exc
    return run


@pytest.mark.parametrize("exc, code, line", [
    (SlmError("bad file a\nb.txt: fix it"), 2, "error: bad file a\\nb.txt: fix it"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), 2, "error: disk full while writing /x/y: free space and run again"),
    (OSError(errno.EACCES, "Permission denied", "/x"), 2, "error: Permission denied (/x): check the path and its permissions"),
])
def test_one_line_and_an_exit_code(capsys, exc, code, line):
    assert run_command(raising(exc)) == code
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_a_command_s_own_code_and_a_bug_s_traceback_pass_through():
    assert run_command(lambda: 7) == 7
    with pytest.raises(OSError, match="busy"):
        run_command(raising(OSError(errno.EBUSY, "busy")))
    with pytest.raises(ValueError):
        run_command(raising(ValueError("a bug")))


def test_python_m_slmkit_train_reports_like_slm(tmp_path, capsys):
    """torchrun's entry point goes through the same handler as the slm command."""
    from slmkit.cli import main as slm
    from slmkit.train import main as train_main

    args = ["--data", str(tmp_path / "no\ndata"), "--out", str(tmp_path / "run")]
    assert train_main(args) == 2
    from_train = capsys.readouterr().err
    assert slm(["train", *args]) == 2
    assert from_train == capsys.readouterr().err and from_train.count("\n") == 1
    assert from_train.startswith("error: data directory ")
