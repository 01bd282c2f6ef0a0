"""Prefect states that say what happened when a command is stopped (Ctrl-C, SIGTERM): the flow
run and every sub-flow run still open end Cancelled, not Running forever."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling

OPEN = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]


def cancel_flow_runs(reason: str) -> None:
    """Cancel this process's flow run and its open descendants. A descendant that a worker runs
    elsewhere (a deployment's flow run) is set Cancelling, so its worker stops it; the ones in
    this process end Cancelled now, as the process is about to exit. Best effort: a Prefect API
    that does not answer must not keep a stopped command alive."""
    root = flow_run.get_id()
    if root is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(root, Cancelled(message=reason), force=True)
            parents = [root]
            while parents:
                open_children = FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=OPEN)),
                )
                children = client.read_flow_runs(flow_run_filter=open_children)
                for child in children:
                    state = Cancelling if child.deployment_id else Cancelled
                    client.set_flow_run_state(child.id, state(message=reason), force=True)
                parents = [child.id for child in children]
    except Exception:  # noqa: BLE001 S110 (the process exits next; the rerun tidies up)
        pass
