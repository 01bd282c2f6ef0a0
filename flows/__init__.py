"""Prefect flows: thin orchestration over ``components``; one module per stage, plus the CLI."""

import os

# Prefect's defaults, tuned for a laptop or CI box with no internet: the ephemeral API server
# may need more than 20 s for its first start (database migrations on a 2-core machine), and
# its telemetry can only fail here. Explicit settings from the user win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# MLflow draws a progress bar per downloaded artifact: noise between our own bars.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

if os.environ.get("PREFECT__FLOW_RUN_ID"):
    # A flow run in a process of its own, started by a worker (``latentlab deploy``) or by
    # ``latentlab serve``: its console shows what the command line's does, not every library's
    # INFO lines ("View run ...", "accelerate was not found"). Before MLflow or diffusers load.
    from components import progress

    progress.configure()
