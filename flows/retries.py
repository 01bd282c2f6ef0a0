"""Retries for the steps that write to the tracking server and its artifact store (training,
publishing): a server that blips (a restart, an S3 outage of a minute) costs a retry, which
resumes from the step's checkpoint or uploads again into the same run; any other failure fails
at once. MLflow's client already retries each request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``);
these retries come after it has given up."""

from __future__ import annotations

import logging

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from components.errors import store_failure


def _store_blip(task: Task, task_run: TaskRun, state: State) -> bool:
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 (the failure being judged)
        failure = store_failure(error)
        if failure is not None and task_run.run_count <= task.retries:
            logging.getLogger("latentlab").warning("%s: %s; retrying", task_run.name, failure)
        return failure is not None
    return False


STORE_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _store_blip}
