"""CI runs our Triton templates without a GPU: Triton's interpreter, in a subprocess.

TRITON_INTERPRET must be set before triton is imported, hence the separate process.
"""

import subprocess
import sys
from pathlib import Path

from triton_on_cpu import interpreter_env

HERE = Path(__file__).resolve().parent


def test_templates_through_triton_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
         str(HERE / "test_templates_interpreter.py"), str(HERE / "test_decode_interpreter.py"),
         str(HERE / "test_backward_interpreter.py")],
        env=interpreter_env(), capture_output=True, text=True, timeout=1500, cwd=HERE.parent,
    )
    tail = (result.stderr + result.stdout)[-8000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], tail
