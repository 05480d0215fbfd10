"""Canary: every private torch symbol the package uses still imports under this torch."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from inductor_flex._compat import COMPAT_MODULES

PACKAGE = Path(__file__).resolve().parent.parent / "inductor_flex"


@pytest.mark.parametrize("module", COMPAT_MODULES)
def test_private_symbols_import(module):
    imported = importlib.import_module(module)
    missing = [name for name in imported.__all__ if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_private_imports_live_in_compat_only():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "_compat" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import torch._", "from torch._")) or "torch.utils._" in stripped and "import" in stripped:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {stripped}")
    assert not offenders, "private torch imports outside _compat:\n" + "\n".join(offenders)


def test_import_has_no_side_effect_on_torch_flex():
    """Importing us leaves torch's own flex_attention operator and its Dynamo tracker alone."""
    code = (
        "import torch\n"
        "from torch._dynamo.variables.higher_order_ops import _hop_name_to_variable_class as r\n"
        "before = dict(r)\n"
        "import inductor_flex\n"
        "added = set(r) - set(before)\n"
        "assert all(r[k] is before[k] for k in before), 'torch entries changed'\n"
        "assert added <= {'inductor_flex_attention'}, added\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
