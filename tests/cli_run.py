"""Helpers of the command-line tests: run ``npdgru`` in-process and check one-line errors."""

from __future__ import annotations

from npdgru.cli import main


def run(capsys, *argv):
    """main(argv) -> (status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(status, err, *needles):
    """Exit status 2 and exactly one ``npdgru: error:`` line holding every needle, no traceback."""
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npdgru: error: "), err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
