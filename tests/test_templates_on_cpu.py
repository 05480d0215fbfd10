"""CI runs our Triton templates without a GPU: Triton's interpreter, in a subprocess.

TRITON_INTERPRET must be set before triton is imported, hence the separate process.
"""

from pathlib import Path

from triton_on_cpu import run_pytest_in_interpreter

HERE = Path(__file__).resolve().parent


def test_templates_through_triton_interpreter():
    result, output = run_pytest_in_interpreter(
        str(HERE / "test_templates_interpreter.py"), str(HERE / "test_decode_interpreter.py"),
        str(HERE / "test_backward_interpreter.py"), timeout=1500)
    tail = output[-8000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], tail
