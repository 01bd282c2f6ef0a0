"""Model and data code imports without Prefect or MLflow: a notebook, a benchmark or another
project can use the models without the orchestration and tracking around them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ORCHESTRATION = ("prefect", "mlflow")
MODEL_AND_DATA = (
    "components.first_stage",
    "components.diffusion",
    "components.conditioning",
    "components.dataset",
    "components.sources",
    "components.images",
    "components.losses",
    "components.latents",
    "components.params",
)

# A fresh interpreter (this one has imported both already) in which importing either fails.
WITHOUT_ORCHESTRATION = """
import importlib, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ModuleNotFoundError(f"{{name}} is not installed (tests/test_imports.py)", name=name)
        return None

sys.meta_path.insert(0, Absent())
for module in {modules}:
    importlib.import_module(module)
print("OK")
"""


def test_model_and_data_code_imports_without_prefect_or_mlflow():
    code = textwrap.dedent(WITHOUT_ORCHESTRATION).format(blocked=ORCHESTRATION, modules=MODEL_AND_DATA)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]
