"""The rooms stay where ../shared/ARCHITECTURE.md puts them: the `[tool.importlinter]` contracts of
pyproject.toml (layers, models/service independence, no torch on the serving path), imports inside
functions included."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: `make test` installs it"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
