"""The platform on a Prefect server: deployments of the sweep, its factors and the single
stages on a process work pool (``latentlab deploy``), run by ``prefect worker start`` on one or
many machines.

Queues: the sweep, which only coordinates, waits on ``sweeps``; factors and single stages on
``factors``, where each (GPU) machine's worker takes one at a time (``--limit 1``). A flow run
runs in the directory its worker was started in (``working_dir: .``): start each worker in a
checkout of the project, with the tracking server, DVC remote and credentials in its
environment (README, "Several machines").
"""

from __future__ import annotations

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from components.params import Params
from flows.data import data_flow
from flows.pipeline import autoencoder_flow, evaluate_flow, factor_flow, ldm_flow, sweep_flow

POOL = "latentlab"
SWEEP_QUEUE, WORK_QUEUE = "sweeps", "factors"
# Flow runs start where their worker was started: each machine's checkout of the project.
JOB = {"working_dir": "."}


def ensure_pool(pool: str) -> str:
    """The type of work pool ``pool``; a process pool of that name (Prefect's default job
    template) is created when there is none."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            return "process"


def deploy(
    params: Params,
    experiment: str,
    *,
    name: str = POOL,
    pool: str = POOL,
    cron: str | None = None,
    fail_on_regression: bool = False,
) -> list[str]:
    """Create or update the deployments ``<flow>/<name>``; return their names. The sweep's
    factors become flow runs of ``factor/<name>``; ``cron`` schedules the sweep (the nightly
    ablation), which with ``fail_on_regression`` ends Failed when a factor got worse than in
    the previous sweep on the same data and parameters."""
    # working_dir is a process pool's setting; a Docker or Kubernetes pool's image decides it.
    job = JOB if ensure_pool(pool) == "process" else {}
    preset = {"params": params.model_dump(mode="json"), "experiment": experiment}
    deployments = [
        (
            sweep_flow,
            {**preset, "factor_deployment": f"{factor_flow.name}/{name}", "fail_on_regression": fail_on_regression},
            SWEEP_QUEUE,
            cron,
        ),
        (factor_flow, {"experiment": experiment}, WORK_QUEUE, None),  # the sweep passes the rest
        (data_flow, preset, WORK_QUEUE, None),
        (autoencoder_flow, preset, WORK_QUEUE, None),
        (ldm_flow, preset, WORK_QUEUE, None),
        (evaluate_flow, preset, WORK_QUEUE, None),  # and a run id, at run time
    ]
    names = []
    for flow, parameters, queue, schedule in deployments:
        deployment = flow.to_deployment(
            name=name,
            entrypoint_type=EntrypointType.MODULE_PATH,  # the installed package: no code upload
            work_pool_name=pool,
            work_queue_name=queue,
            job_variables=job,
            parameters=parameters,
            cron=schedule,
        )
        deployment.apply()
        names.append(f"{flow.name}/{name}")
    return names
