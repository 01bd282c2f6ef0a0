"""Where a sweep's time went: training, sampling, and everything else (orchestration, tracking, I/O).

    python benchmarks/sweep.py SWEEP_RUN_ID     (run where the sweep ran: same MLflow store)

Reads MLflow only. Training = the children's ``wall_time_s`` (batches only); sampling = the
evaluate runs' sample counts over their measured img/s (headline and DDIM curve) plus the LDM
runs' evaluations during training (``budget_eval_s``) and sample-grid time (``grid_s``, where
recorded). The rest of the sweep run's wall time is
overhead: feature extraction for metrics, latent encoding, grids, checkpoints, MLflow, Prefect.
The sweep run starts once the data version and the FID feature network are ready, so building
the data (its own ``data`` run) and training the extractor (its own run, ``wall_time_s``) are
outside it: the command's wall time minus the sweep run's is their cost and Prefect's start.
Writes reports/benchmarks/sweep-<run>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.contract import TAG_BUDGET
from components.store import tracking_uri  # noqa: E402
from components.sweep_summary import read_sweep_entries  # noqa: E402


def main(sweep_run_id: str) -> dict:
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    sweep = client.get_run(sweep_run_id)
    total = (sweep.info.end_time - sweep.info.start_time) / 1000
    training = sampling = 0.0
    for entry in read_sweep_entries(sweep.data.tags).values():  # every factor and seed
        ae, ldm, evaluation = (entry.run(stage) for stage in ("autoencoder", "ldm", "evaluate"))
        for run_id in (ae, ldm):
            if run_id:
                training += client.get_run(run_id).data.metrics.get("wall_time_s", 0.0)
        if ldm:  # evaluations during training; sample grids (an autoencoder's are reconstructions)
            for name in ("budget_eval_s", "fid_eval_s", "grid_s"):  # (fid_eval_s: older runs)
                sampling += sum(m.value for m in client.get_metric_history(ldm, name))
        if evaluation:
            run = client.get_run(evaluation)
            params, metrics = run.data.params, run.data.metrics
            sampling += int(params["eval.samples"]) / metrics["sample_img_per_s"]
            for point in client.get_metric_history(evaluation, "ddim_sample_img_per_s"):
                sampling += int(params["eval.curve_samples"]) / point.value
    result = {
        "sweep_run_id": sweep_run_id,
        "budget": sweep.data.tags.get(TAG_BUDGET),
        "wall_s": round(total, 1),
        "training_s": round(training, 1),
        "sampling_s": round(sampling, 1),
        "other_s": round(total - training - sampling, 1),
        "other_share": round((total - training - sampling) / total, 3),
    }
    out = Path("reports/benchmarks") / f"sweep-{sweep_run_id[:8]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1]), indent=2))
