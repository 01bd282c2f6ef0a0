"""Every ``latentlab`` command in README.md and docs/ works as written, so the documentation cannot
go stale: each one parses with today's command line, and each one the suite can afford runs, at
tiny scale, in a fresh project, in the order a user would run them.

A documented command runs as written except for its preset: commands that take parameters run
on a tiny preset (params/smoke.yaml with the tiny sweep's settings), so that "latentlab sweep"
and "latentlab sweep --params params/smoke.yaml" are the same minute of work. Placeholders
(``RUN_ID``, ``/path/to/images``, ...) become real runs and folders of that project.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

from components.presets import apply_override
from flows.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands that serve until stopped or need a Prefect server with workers: their own tests run them.
RUN_ELSEWHERE = {
    "sample": "test_tasks.py::test_superres_and_inpaint_sweeps_train_evaluate_report_and_sample_each_task, "
    "test_sweep.py::test_sweep_marks_a_failed_factor_redoes_only_it_then_reuses_everything",
    "ui": "test_commands.py::test_ui_serves_this_projects_runs_on_loopback, test_ui_browser.py",
    "serve": "test_deployments.py",
    "deploy": "test_deployments.py",
}
ORDER = ["params", "data", "train-ae", "train-ldm", "sweep", "evaluate", "report", "runs", "reproduce"]


def documented() -> list[tuple[str, list[str]]]:
    """(where, argv after ``latentlab``) for each ``latentlab`` line of a fenced bash block."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():  # (continued lines joined)
                if line.strip().startswith("latentlab "):
                    words = shlex.split(line, comments=True)
                    found.append((f"{doc.relative_to(REPO)}: {line.strip()}", words[1:]))
    return found


DUMMY = {
    "RUN_ID": "0123456789abcdef0123456789abcdef",
    "LDM_RUN_ID": "0123456789abcdef0123456789abcdef",
    "AE_RUN_ID": "0123456789abcdef0123456789abcdef",
    "SWEEP_RUN_ID": "0123456789abcdef0123456789abcdef",
}


def test_the_docs_show_every_command():
    shown = {argv[0] for _, argv in documented() if argv and not argv[0].startswith("-")}
    assert set(COMMANDS) <= shown, f"no example of {sorted(set(COMMANDS) - shown)} in README.md or docs/"


@pytest.mark.parametrize("where, argv", documented(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_documented_command_parses(where, argv):
    parser = build_parser()
    try:
        parser.parse_args([DUMMY.get(word, word) for word in argv])
    except SystemExit as exit:
        assert exit.code == 0, f"{where}: latentlab rejects it (see the message above)"


def _preset(path: Path, base: Path, overrides: list[str]) -> Path:
    tree: dict = {"extends": str(base)}
    for assignment in overrides:
        apply_override(tree, assignment)
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def _images(root: Path) -> Path:
    """A folder as the README describes: a subfolder per class, a caption file."""
    for label, colour in (("cats", (200, 40, 0)), ("dogs", (0, 60, 200))):
        (root / label).mkdir(parents=True)
        for i in range(16):  # (enough for a train split of one batch)
            Image.new("RGB", (24, 24), (colour[0], colour[1] + 8 * i, colour[2])).save(root / label / f"{i}.png")
    (root / "captions.csv").write_text("file,caption\ncats/0.png,a red cat\n")
    return root


def _latest(stage: str, factor: str | None = None) -> str:
    where = f"tags.`latentlab.stage` = '{stage}'" + (f" and tags.`latentlab.factor` = '{factor}'" if factor else "")
    runs = mlflow.search_runs(
        experiment_names=["latentlab"],
        filter_string=where,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    assert runs, f"no {stage} run to put in a documented command"
    return runs[0].info.run_id


@pytest.mark.slow
def test_the_documented_commands_run(project, repo, cli, tiny_sweep, capsys):
    tiny = _preset(project / "tiny.yaml", repo / "params/smoke.yaml", [*tiny_sweep, "sweep.factors=[4]"])
    _preset(project / "mine.yaml", tiny, ["ldm.lr=2.0e-4"])
    images = _images(project.parent / "images")
    placeholders = {
        "RUN_ID": lambda command: _latest("autoencoder" if command == "reproduce" else "ldm"),
        "LDM_RUN_ID": lambda command: _latest("ldm"),
        "AE_RUN_ID": lambda command: _latest("autoencoder"),
        "SWEEP_RUN_ID": lambda command: _latest("sweep"),
    }
    todo: dict[tuple[str, ...], str] = {}
    for where, argv in documented():
        if argv[0] in RUN_ELSEWHERE or "--help" in argv:
            continue
        assert argv[0] in ORDER, f"{where}: add {argv[0]} to ORDER or RUN_ELSEWHERE"
        words = []
        skip = False
        for word in argv[1:]:
            if skip:
                skip = False
                continue
            if word == "--params":  # the tiny preset stands in for the documented one
                skip = True
                continue
            words.append(word.replace("/path/to/images", str(images)))
        if COMMANDS[argv[0]].params and argv[0] != "params":
            words += ["--params", str(tiny)]
        elif argv[0] == "params" and "--params" in argv:
            words += ["--params", str(project / "mine.yaml")]
        todo.setdefault((argv[0], *words), where)

    ran = []
    for command in sorted(todo, key=lambda c: ORDER.index(c[0])):
        argv = [placeholders[w](command[0]) if w in placeholders else w for w in command]
        # In this process, as `latentlab` would (the console script is flows.cli:main): a new
        # process per command would spend most of this test importing torch, Lightning and MLflow.
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{todo[command]}\n$ latentlab {shlex.join(argv)}\n{err[-3000:]}"
        assert "Traceback" not in err, todo[command]
        ran.append(command[0])
    # what a user reads after the sweep: the runs it made, newest first, and a report that stands alone
    assert {"sweep", "runs", "reproduce", "report", "evaluate"} <= set(ran), ran
    listing = cli(project, "runs").stdout
    assert _latest("sweep") in listing and listing.index("reproduce") < listing.index("sweep")
    reports = list(project.glob("reports/*-sweep-*/report.md"))
    assert reports and all("## Verdict" in r.read_text() and "## Provenance" in r.read_text() for r in reports)
