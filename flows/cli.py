"""``latentlab`` command line: parse, validate parameters, call a flow, report.

User errors (bad parameters, bad data, a missing run) end in one message and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from components import progress, workspace
from components.credentials import redact
from components.errors import InfrastructureError, Reported, UserError, disk_failure, store_failure
from components.params import Params
from components.presets import load_params
from components.store import DEFAULT_EXPERIMENT

console = Console(stderr=True)


def cmd_data(params: Params, args: argparse.Namespace) -> None:
    from flows.data import data_flow

    result = data_flow(params, experiment=args.experiment)
    counts = result.manifest["counts"]
    console.print(
        f"[bold green]Data version {result.version}[/]: {counts['total']} images "
        f"({counts['train']} train, {counts['val']} val) in {len(result.manifest['classes'])} "
        f"classes, {counts['skipped']} skipped; MLflow run {result.run_id}"
    )
    for skipped in result.manifest["skipped"]:
        console.print(f"  skipped [yellow]{skipped['file']}[/]: {skipped['reason']}")
    print(result.version)


def cmd_train_ae(params: Params, args: argparse.Namespace) -> None:
    import mlflow

    from flows.pipeline import autoencoder_flow

    result = autoencoder_flow(params, experiment=args.experiment)
    if result.autoencoder_run is None:
        console.print("f=1 is pixel space: there is no autoencoder to train.")
        return
    metrics = mlflow.get_run(result.autoencoder_run).data.metrics
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("psnr", "ssim", "rfid") if k in metrics)
    verb = "Reused" if result.reused else "Trained"
    console.print(f"[bold green]{verb} autoencoder f={result.factor} ({params.ae.regularizer})[/]: {shown}")
    print(result.autoencoder_run)


def cmd_train_ldm(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import ldm_flow

    result = ldm_flow(params, experiment=args.experiment)
    verb = "Reused" if result.reused else "Trained"
    console.print(
        f"[bold green]{verb} latent diffusion model f={result.tags['latentlab.factor']}[/] "
        f"(first stage {result.tags['latentlab.first_stage']})"
    )
    print(result.run_id)


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import evaluate_flow

    result = evaluate_flow(params, args.run, experiment=args.experiment)
    m = result.metrics
    verb = "Reused evaluation" if result.reused else "Evaluated"
    console.print(
        f"[bold green]{verb} f={result.tags['latentlab.factor']}[/]: FID {m['fid']:.4g}{_interval(m, 'fid')}, "
        f"KID {m['kid_mean']:.4g}{_interval(m, 'kid')}, "
        f"precision {m['precision']:.3g}, recall {m['recall']:.3g}, {m['sample_img_per_s']:.3g} samples/s"
    )
    print(result.run_id)


def _interval(metrics: dict, name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return "" if low is None or high is None else f" [{low:.4g}, {high:.4g}]"


def cmd_sweep(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import sweep_flow

    # A sweep with a factor that did not finish ends Failed in Prefect and holds the sweep.
    state = sweep_flow(
        params, experiment=args.experiment, fail_on_regression=args.fail_on_regression, return_state=True
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):  # the flow itself failed (not a factor): its own error, as raised
        raise result
    verb = "Reused finished sweep" if result.reused else "Sweep"
    console.print(f"[bold green]{verb} {result.run_id}[/]: report {result.report}")
    for name, entry in result.failed.items():
        console.print(f"  [red]{name}[/]: {entry.status} (rerun the sweep to retry it)")
    for regression in result.regressions:
        console.print(f"  [yellow]worse than the previous sweep[/] {regression}")
    print(result.run_id)
    if state.is_failed():
        raise SystemExit(1)


def cmd_sample(params: Params, args: argparse.Namespace) -> None:
    from flows.sample import sample_flow

    out = args.out or Path("samples") / args.run.replace("models:/", "").replace("/", "-").replace("@", "-")
    paths = sample_flow(
        params, args.run, out, size=args.size, count=args.count, steps=args.steps, images=args.images, masks=args.masks
    )
    console.print(f"[bold green]{len(paths)} image(s)[/] in {out}")
    print(out)


def cmd_report(params: Params, args: argparse.Namespace) -> None:
    from flows.report import report_flow

    path = report_flow(args.run, experiment=args.experiment)
    console.print(f"[bold green]Report[/] {path}")
    print(path)


def cmd_reproduce(params: Params, args: argparse.Namespace) -> None:
    from flows.reproduce import reproduce_flow

    result = reproduce_flow(params, args.run, experiment=args.experiment, allow_code_change=args.allow_code_change)
    table = Table(title=f"Reproduction of {result.original_run_id} (run {result.run_id})")
    for column in ("metric", "original", "reproduced", "relative difference"):
        table.add_column(column)
    for c in result.comparisons:
        mark = "[green]ok[/]" if c.relative <= result.tolerance else "[red]out of tolerance[/]"
        table.add_row(c.metric, f"{c.original:.5g}", f"{c.reproduced:.5g}", f"{c.relative:.2%} {mark}")
    console.print(table)
    verdict = "within" if result.within_tolerance else "NOT within"
    console.print(f"Metrics {verdict} tolerance {result.tolerance:.0%} (reproduce.tolerance).")
    print(result.run_id)
    if not result.within_tolerance:
        raise SystemExit(1)


def cmd_ui(params: Params | None, args: argparse.Namespace) -> None:
    import signal
    import socket
    import subprocess

    from components.store import check_store, tracking_uri
    from components.tracking import close_all_orphans

    uri = tracking_uri()
    if not uri.startswith("sqlite:") and "://" in uri and not uri.startswith("file:"):
        raise UserError(
            f"MLFLOW_TRACKING_URI is the server {redact(uri)}: open it in a browser; `ui` serves local stores."
        )
    check_store(uri)
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"Cannot serve on {args.host}:{args.port} ({exc.strerror}): pass another --port.") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[bold yellow]Warning:[/] the MLflow UI has no authentication; on {args.host} anyone who can "
            "reach this machine can read, change and delete your runs."
        )
    close_all_orphans()  # so RUNNING in the UI means running
    console.print(f"MLflow UI for {redact(uri)} (Ctrl-C to stop); the runs of experiment {args.experiment!r}:")
    print(runs_page(f"http://{args.host}:{args.port}", args.experiment), flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    # One worker and no job runner: one person's browser is the only client, and MLflow's default
    # (4 workers, a job runner and 7 huey consumers for GenAI jobs this project never submits)
    # spends ~29 CPU-seconds starting against ~6 (2-core Xeon, measured), 14 s to /health against 7.
    lean = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its own process group, so that stopping `ui` (Ctrl-C or SIGTERM) stops the server's workers too.
    server = subprocess.Popen(command, start_new_session=True, env=lean)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        raise SystemExit(server.wait())
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        raise SystemExit(0) from None


def runs_page(base: str, experiment: str) -> str:
    """The UI page of ``experiment``'s runs table. MLflow 3.17's UI opens every experiment on its
    GenAI overview (a "GenAI / Model training" switch kept in the browser, which ignores the
    experiment's ``mlflow.experimentKind`` tag); ``workflowType=machine_learning`` in the
    address sets that switch to "Model training"."""
    import mlflow

    found = mlflow.MlflowClient().get_experiment_by_name(experiment)
    if found is None:  # nothing run yet: the experiments list
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_deploy(params: Params, args: argparse.Namespace) -> None:
    from flows.deployments import SWEEP_QUEUE, WORK_QUEUE, deploy

    names = deploy(
        params,
        args.experiment,
        name=args.name,
        pool=args.pool,
        cron=args.cron,
        fail_on_regression=args.fail_on_regression,
    )
    console.print(f"[bold green]Deployed[/] on work pool '{args.pool}': {', '.join(names)}")
    console.print(f"Schedule: {args.cron or 'none (run on demand)'}. Next, each in a checkout of this project:")
    console.print(f"  prefect worker start --pool {args.pool} --work-queue {SWEEP_QUEUE}   (one, anywhere)")
    console.print(f"  prefect worker start --pool {args.pool} --work-queue {WORK_QUEUE} --limit 1   (per machine)")
    console.print(f"  prefect deployment run sweep/{args.name}")
    print("\n".join(names))


SERVE_STOP_GRACE_S = 15.0


def _stop_within(grace_s: float) -> None:
    """Ctrl-C ends this process within ``grace_s``. Prefect's runner sometimes misses a Ctrl-C that
    lands while it starts (seen: still serving 3 minutes later); the first SIGINT now raises
    KeyboardInterrupt as always and arms a timer that ends the process if shutdown stalls."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        timer = threading.Timer(grace_s, lambda: os._exit(130))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    from flows.pipeline import sweep_flow

    console.print(
        f"Serving deployment sweep/{args.name} (cron: {args.cron or 'none, run on demand'}); Ctrl-C stops it. "
        f"Run it now: prefect deployment run sweep/{args.name}"
    )
    print(f"{sweep_flow.name}/{args.name}", flush=True)
    _stop_within(SERVE_STOP_GRACE_S)
    with contextlib.redirect_stdout(sys.stderr):  # Prefect's banner and the runs' output: stdout keeps the name
        sweep_flow.serve(
            name=args.name,
            cron=args.cron,
            parameters={
                "params": params.model_dump(mode="json"),
                "experiment": args.experiment,
                "fail_on_regression": args.fail_on_regression,
            },
        )


PARAMETERS_HEADER = """# Parameters

Every key of `params/default.yaml` (the main job), its value there (or the schema's default) and
what it means. A preset of your own layers on these (`extends:` names another base); print the
resolved set with `latentlab params --params FILE [--set KEY=VALUE]`. Generated by
`latentlab params --markdown > docs/parameters.md`; a test keeps it current.
"""


def cmd_params(params: Params, args: argparse.Namespace) -> None:
    from components.params import field_descriptions
    from components.presets import resolve

    origin = resolve(args.params or workspace.default_params(), args.set).origin
    meaning = field_descriptions()
    values = {key: json.dumps(value) for key, value in params.flat().items()}
    if args.markdown:  # docs/parameters.md is this, for the default preset
        rows = [f"| `{k}` | `{v}` | {origin[k]} | {meaning.get(k, '')} |" for k, v in values.items()]
        print("\n".join([PARAMETERS_HEADER, "| key | value | from | meaning |", "|---|---|---|---|", *rows]))
        return
    width = max(map(len, values)), 16, max(map(len, origin.values()))  # (a longer value pushes its line on)
    lines = [
        f"{k:<{width[0]}}  {v:<{width[1]}}  {origin[k]:<{width[2]}}  {meaning.get(k, '')}" for k, v in values.items()
    ]
    with contextlib.suppress(BrokenPipeError):  # (| head)
        sys.stdout.write("\n".join(lines) + "\n")


def cmd_runs(params: Params | None, args: argparse.Namespace) -> None:
    import mlflow

    from components.recent_runs import age, recent
    from components.store import sqlite_path, tracking_uri

    uri = tracking_uri()
    fresh = (path := sqlite_path(uri)) is not None and not path.exists()
    mlflow.set_tracking_uri(uri)
    found = [] if fresh else recent(args.experiment, args.limit, args.stage)  # (a fresh store is not created)
    if not found:
        what = f"{args.stage} runs" if args.stage else "runs"
        console.print(f"No {what} in experiment {args.experiment!r} yet: start with `latentlab sweep`.")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("age", "status", "stage", "f", "FID", "PSNR", "run id", "name"):
        table.add_column(column, no_wrap=True)
    for run in found:
        fid = "" if run.fid is None else f"{run.fid:.4g}"
        psnr = "" if run.psnr is None else f"{run.psnr:.4g}"
        table.add_row(age(run.started_ms), run.status, run.stage, run.factor, fid, psnr, run.run_id, run.name)
    Console(width=200).print(table)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


@dataclass(frozen=True)
class Command:
    """One ``latentlab`` command: what it does, prints and writes, and which options act on it."""

    summary: str
    handler: Callable[[Params | None, argparse.Namespace], None]
    prints: str  # on stdout (progress and messages go to stderr)
    writes: str
    fails: str = ""  # what exit code 1 means for it ("": it never exits 1)
    params: bool = True  # --params and --set act on it
    flows: bool = True  # it runs Prefect flows (-v/-q act on it; the store is checked first)
    experiment: bool = True  # --experiment acts on it
    services: bool = True  # it talks to the tracking store or a server (exit code 3 when they fail)
    options: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()


RUN = (("--run",), {"required": True, "metavar": "RUN_ID", "help": "the run's id (latentlab runs, or the MLflow UI)"})
REGRESSION_FLAG = (
    ("--fail-on-regression",),
    {
        "action": "store_true",
        "help": "exit 1 when a factor got worse than in the previous sweep on the same data and params",
    },
)
CRON = (("--cron",), {"default": None, "help": "schedule the sweep, e.g. '0 3 * * *' (every night at 03:00)"})
NAME = (("--name",), {"default": "latentlab", "help": "deployment name: sweep/NAME (default %(default)s)"})
SWEEP_RUNS = "MLflow runs: data, and per factor autoencoder (f > 1), ldm and evaluate, nested under a sweep run"

COMMANDS: dict[str, Command] = {
    "data": Command(
        "Prepare, version (DVC) and record the dataset.",
        cmd_data,
        "the data version (the md5 in data.dvc)",
        "data/, data.dvc, a push to data.remote, a data run in MLflow",
    ),
    "train-ae": Command(
        "Train (or reuse) the first-stage autoencoder for ae.factor.",
        cmd_train_ae,
        "the autoencoder run's id (nothing at f=1, which has none)",
        "an autoencoder run with its checkpoint, metrics and registered model autoencoder-f<f>-<regularizer>",
    ),
    "train-ldm": Command(
        "Train (or reuse) the latent diffusion model for ae.factor, and its autoencoder first.",
        cmd_train_ldm,
        "the LDM run's id",
        "an ldm run (and its autoencoder run) with checkpoints, samples and a version of registered model ldm",
    ),
    "evaluate": Command(
        "FID, KID, precision and recall, with intervals, of a finished LDM run.",
        cmd_evaluate,
        "the evaluate run's id",
        "an evaluate run: metrics, samples.png, the DDIM curve",
        options=(RUN,),
    ),
    "sweep": Command(
        "The main job: every factor in sweep.factors, compared in a report.",
        cmd_sweep,
        "the sweep run's id",
        f"{SWEEP_RUNS}; reports/<date>-sweep-<id>/report.md, also on the sweep run",
        fails="a factor failed, or --fail-on-regression found one worse than before",
        options=(REGRESSION_FLAG,),
    ),
    "sample": Command(
        "Images from an LDM run: new ones (at N times its training size), or its task on given images.",
        cmd_sample,
        "the folder the images were written to",
        "PNGs in --out (default samples/<run>/); nothing in MLflow",
        options=(
            (
                ("--run",),
                {
                    "required": True,
                    "metavar": "RUN_ID|MODEL_URI",
                    "help": "an ldm run's id, or a registered version: models:/ldm/3, models:/ldm@f8",
                },
            ),
            (
                ("--size",),
                {"type": _positive, "default": 1, "help": "N times the training size on each side (generate)"},
            ),
            (("--count",), {"type": _positive, "default": 16, "help": "images to generate (default %(default)s)"}),
            (
                ("--steps",),
                {"type": _positive, "default": None, "help": "DDIM steps (default: the run's ldm.sample_steps)"},
            ),
            (
                ("--images",),
                {"type": Path, "default": None, "help": "superres / inpaint: a folder of images to work on"},
            ),
            (
                ("--masks",),
                {
                    "type": Path,
                    "default": None,
                    "help": "inpaint: a folder of masks, one per image, same name (white: fill)",
                },
            ),
            (("--out",), {"type": Path, "default": None, "help": "where the PNGs go (default samples/<run>/)"}),
        ),
    ),
    "report": Command(
        "Write a sweep's report again, from MLflow alone.",
        cmd_report,
        "the report's path",
        "reports/<date>-sweep-<id>/ (report.md and its plots), also logged to the sweep run",
        params=False,
        options=((("--run",), {**RUN[1], "metavar": "SWEEP_RUN_ID", "help": "a sweep run's id"}),),
    ),
    "reproduce": Command(
        "Retrain a recorded autoencoder or LDM run from its data version and compare its metrics.",
        cmd_reproduce,
        "the reproduce run's id (the table of metrics goes to stderr)",
        "a reproduce run and the retrained stage's run; data/ is left as it was",
        fails="a metric lies outside reproduce.tolerance",
        options=(
            (RUN[0], {**RUN[1], "required": False}),  # (checked in main: the positional form counts too)
            (("run_id",), {"nargs": "?", "help": argparse.SUPPRESS}),  # (the older positional form)
            (("--allow-code-change",), {"action": "store_true", "help": "go on when the code differs from the run's"}),
        ),
    ),
    "runs": Command(
        "List sweeps and runs, newest first: age, status, stage, f, FID, PSNR, run id.",
        cmd_runs,
        "the table",
        "nothing",
        params=False,
        flows=False,
        options=(
            (("--limit",), {"type": int, "default": 20, "help": "at most this many (default %(default)s)"}),
            (("--stage",), {"choices": ("data", "autoencoder", "ldm", "evaluate", "sweep", "reproduce")}),
        ),
    ),
    "ui": Command(
        "The MLflow UI for this project's tracking store, on 127.0.0.1.",
        cmd_ui,
        "the address of the experiment's runs table",
        "nothing (open runs left by a killed process are closed first)",
        params=False,
        flows=False,
        options=(
            (("--host",), {"default": "127.0.0.1", "help": "bind address (default loopback only: no authentication)"}),
            (("--port",), {"type": int, "default": 5000, "help": "port (default %(default)s)"}),
        ),
    ),
    "deploy": Command(
        "Deploy the sweep, its factors and the stages to a Prefect work pool, for workers on any machine.",
        cmd_deploy,
        "the deployments' names, one per line",
        "deployments <flow>/NAME and the work pool on the Prefect server (PREFECT_API_URL)",
        options=(
            NAME,
            CRON,
            REGRESSION_FLAG,
            (("--pool",), {"default": "latentlab", "help": "Prefect process work pool, created if missing"}),
        ),
    ),
    "serve": Command(
        "Serve the sweep as a Prefect deployment from this process, until stopped.",
        cmd_serve,
        "the deployment's name",
        "deployment sweep/NAME on the Prefect server (PREFECT_API_URL); each sweep as `latentlab sweep` does",
        options=(NAME, CRON, REGRESSION_FLAG),
    ),
    "params": Command(
        "Print the resolved parameters: each key, its value, where it came from, what it means.",
        cmd_params,
        "the table (a Markdown table with --markdown)",
        "nothing",
        flows=False,
        experiment=False,
        services=False,
        options=((("--markdown",), {"action": "store_true", "help": "a Markdown table (docs/parameters.md)"}),),
    ),
}

EXIT_CODES = {
    0: "done",
    1: "",  # the command's own ``fails``
    2: "bad input or usage; nothing was recorded",
    3: "the tracking store or server, its artifact store or the Prefect server failed; rerun when it answers",
    130: "interrupted; finished work is kept, rerun to resume",
}


def _epilog(command: Command) -> str:
    applies = {0: True, 1: bool(command.fails), 2: True, 3: command.services, 130: command.flows}
    codes = [
        f"  {code:>3}  {command.fails if code == 1 else meaning}"
        for code, meaning in EXIT_CODES.items()
        if applies[code]
    ]
    stderr = "progress, results and messages" if command.flows else "messages"
    return "\n".join(
        [f"stdout:  {command.prints}", f"stderr:  {stderr}", f"writes:  {command.writes}", "exit codes:", *codes]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentlab",
        description=__doc__.splitlines()[0],
        epilog="Each command's --help says what it prints, writes and its exit codes.",
    )
    parser.add_argument("--version", action="version", version=f"latentlab {version('latentlab')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=command.summary,
            description=command.summary,
            epilog=_epilog(command),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # --params/--set are accepted everywhere (DESIGN.md's contract), shown only where they act
        hidden = {} if command.params else {"help": argparse.SUPPRESS}
        sub.add_argument(
            "--params",
            type=Path,
            default=None,
            **({"help": f"YAML preset (default {workspace.PARAMS_FILE})"} | hidden),
        )
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            **({"help": "override one parameter, e.g. ae.factor=8 (repeatable)"} | hidden),
        )
        if command.experiment:
            sub.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default %(default)s)")
        if command.flows:
            loudness = sub.add_mutually_exclusive_group()
            loudness.add_argument(
                "-v", "--verbose", action="store_true", help="also Prefect's task lines and library logs"
            )
            loudness.add_argument("-q", "--quiet", action="store_true", help="only results, warnings and errors")
        for flags, options in command.options:
            sub.add_argument(*flags, **options)
        sub.set_defaults(handler=command.handler)
    return parser


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for a user error or a store that did not answer the
    CLI's message says it all, and a failure already reported was logged in a line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(error, (UserError, Reported))
            or (error is not None and (store_failure(error) or disk_failure(error)))
        )


def _quiet_user_errors() -> None:
    drop = _DropUserErrorTracebacks()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop)


TRAINS = ("train-ae", "train-ldm", "sweep")  # the commands that train here, on these params
# The stage of the run each command names (``--run`` or the positional run id).
RUN_STAGES = {"evaluate": ("ldm",), "report": ("sweep",), "reproduce": ("autoencoder", "ldm")}


def _check_services(params: Params, args: argparse.Namespace) -> None:
    """What can be checked without Prefect, whose server takes seconds to start: the Prefect
    server the command needs, the tracking store, an image folder, and the run a command names.
    A user error or a dead service then ends in seconds."""
    from components.sources import require_folder
    from components.store import check_prefect_server, check_run, check_store, glance

    if args.command in ("serve", "deploy") and not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            f"{args.command} needs a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    if os.environ.get("PREFECT_API_URL"):
        check_prefect_server(os.environ["PREFECT_API_URL"])
    if args.command in ("serve", "deploy"):
        return  # (their runs start later, on workers with their own stores)
    check_store()
    if args.command in TRAINS:  # (a GPU preset on a machine without one, before any data is built)
        from components.training import require_cuda  # (loads Lightning: only for a cuda preset)

        for section in ("ae", "ldm"):
            if getattr(params, section).accelerator == "cuda":
                require_cuda(section)
    if params is not None and params.data.source == "folder" and args.command not in ("report", "reproduce"):
        require_folder(params.data.path)  # (those two build no data)
    run_id = getattr(args, "run", None)
    if args.command in RUN_STAGES and run_id:
        command = f"latentlab {args.command}"
        seen = glance(run_id)
        if seen is not None:
            check_run(run_id, seen, RUN_STAGES[args.command], command)
        else:  # a store only MLflow can read (the flow checks the run's tags too)
            import mlflow

            from components.runs import run_of_stage
            from components.store import tracking_uri

            mlflow.set_tracking_uri(tracking_uri())
            run_of_stage(run_id, RUN_STAGES[args.command], command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    if args.command == "reproduce":  # --run RUN_ID, as every command; the older positional still works
        args.run = args.run or args.run_id
        if not args.run:
            console.print("[bold red]latentlab reproduce:[/] name the run: --run RUN_ID (see `latentlab runs`).")
            return 2
    try:
        if command.params:
            params = load_params(args.params or workspace.default_params(), args.set)
        else:
            params = None
            if args.params or args.set:
                console.print(f"latentlab {args.command}: --params and --set do not act on this command; ignored.")
        if command.flows:
            _check_services(params, args)
            _quiet_user_errors()
            progress.configure(1 if args.verbose else -1 if args.quiet else 0)
        elif args.command == "runs":
            from components.store import check_store

            check_store()
        args.handler(params, args)
    except InfrastructureError as exc:
        console.print(f"[bold red]latentlab {args.command}:[/] {redact(str(exc))}", highlight=False)
        return 3
    except UserError as exc:
        console.print(f"[bold red]latentlab {args.command}:[/] {redact(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print(f"latentlab {args.command}: interrupted; finished work is kept, rerun to resume.")
        return 130
    except Exception as exc:
        disk = disk_failure(exc)
        if disk is not None:
            console.print(f"[bold red]latentlab {args.command}:[/] {redact(disk)}", highlight=False)
            return 2
        failure = store_failure(exc)
        if failure is None:
            raise
        console.print(
            f"[bold red]latentlab {args.command}:[/] the tracking server or its artifact store failed: {failure}. "
            "The run is marked FAILED and nothing unfinished is registered; rerun when it answers and the run resumes.",
            highlight=False,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
