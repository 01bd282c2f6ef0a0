"""Model and data code imports without Prefect or MLflow: a notebook, a benchmark or another
project can use the models without the orchestration and tracking around them."""

from __future__ import annotations

import ast
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


# --- the import graph (benchmarks/architecture.py reads it with ast) -------------------------------

COMPOSERS = {"flows.pipeline", "flows.cli", "flows.deployments", "flows.reproduce", "flows.sample"}  # compose stages
MAX_LEVELS = 8


def test_the_import_graph_has_no_cycle_no_upward_arrow_and_at_most_eight_levels():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import architecture

    found = architecture.measure(None)
    assert found["parse_errors"] == [] and found["import_cycles"] == [] and found["upward_arrows"] == []
    assert found["counts"]["levels"] <= MAX_LEVELS, found["longest_chain"]


def test_stage_modules_never_import_each_other():
    """Only the composers import stage modules: a stage gets what it needs from others through
    the flow that composes it (``flows.pipeline``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import architecture

    sources = architecture.read_sources(None)
    modules = {p.removesuffix(".py").replace("/", "."): t for p, t in sources.items()}
    stages = {m for m, text in modules.items() if "(Stage):" in text}
    assert {"flows.autoencoder", "flows.ldm", "flows.evaluate", "flows.extractor", "flows.sweep"} <= stages
    for module, text in modules.items():
        if module in COMPOSERS:
            continue
        imported, _ = architecture.imports_of(ast.parse(text), module, set(modules))
        assert not imported & (stages - {module}), f"{module} imports a stage module"
