"""The layering is checked, not just written down: import-linter runs the contracts in pyproject.toml
([tool.importlinter]: runtime layers, the model layer free of kernels, the file format free of everything, the
quantizer on the file format only, the runtime never importing the quantizer, no cycles between sibling modules)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    proc = lint(ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_linter_catches_an_upward_import(tmp_path):
    """The same tool on a contract the code breaks on purpose (the layers upside down) must fail: the check is live."""
    config = tmp_path / "upside_down.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["tinyserve"]\n\n[[tool.importlinter.contracts]]\n'
                      'name = "upside down"\ntype = "layers"\nlayers = ["tinyserve.model", "tinyserve.runtime"]\n')
    proc = lint(config)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout


def test_importing_the_file_format_loads_nothing_else():
    """The quantizer and the loader import tinyserve_kernels.layout; that must not build or load any kernel."""
    code = "import sys, tinyserve_kernels.layout; print(sorted(m for m in sys.modules if m.startswith(('tinyserve', 'triton'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['tinyserve_kernels', 'tinyserve_kernels.layout']"
