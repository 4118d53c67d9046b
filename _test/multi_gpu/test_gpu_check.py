"""The GPU check script itself runs: its multi-rank checks on CPU ranks (gloo), each against one process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_check.py")


def test_gpu_check_passes_on_gloo():
    done = subprocess.run([sys.executable, str(SCRIPT), "--backend", "gloo"], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert done.returncode == 0 and len(lines) == 3 and all(line.startswith("PASS") for line in lines), \
        done.stdout[-3000:] + done.stderr[-3000:]
