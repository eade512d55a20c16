from __future__ import annotations

import subprocess
import sys

import pytest


def run(spec: str) -> int:
    code = "from memckpt.faults import crash_point\nfor i in range(3):\n    crash_point('p')\n    print(i, flush=True)\n"
    return subprocess.run([sys.executable, "-c", code], env={"MEMCKPT_FAULTS": spec}, capture_output=True, text=True).returncode


@pytest.mark.integration
def test_crash_point_ends_the_process_on_the_nth_hit() -> None:
    assert run("p=exit@2") == 137
    assert run("p=kill") == -9
    assert run("other=exit") == 0
