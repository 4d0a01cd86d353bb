"""The project's promise for bad input, checked one way: exit 2 and one stderr line naming the problem."""

from __future__ import annotations

import subprocess


def assert_one_line_error(out: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Assert `hyperofa <command>` failed with status 2 and a single `error:` line holding every needle."""
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hyperofa {command}: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]
