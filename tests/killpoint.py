"""``python tests/killpoint.py POINT latentlab-args...``: the latentlab command line, held at
POINT so a test can kill it there with SIGKILL.

Points whose moment is visible from outside (a lock file, a RUNNING run, a checkpoint) are
found by polling in the test; this runner holds the ones that pass too quickly to catch: it
wraps the step, writes ``$LATENTLAB_KILL_MARKER`` when the step is reached (in the state named
below) and then waits to be killed. Any other POINT runs the command unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow.artifacts

import components.latents
import flows.autoencoder
import flows.ldm
from flows.cli import main


def hold(point: str) -> None:
    Path(os.environ["LATENTLAB_KILL_MARKER"]).write_text(point)
    while True:
        time.sleep(60)


def held_before(point: str, step: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        hold(point)
        return step(*args, **kwargs)

    return wrapper


def first_stage_downloaded_not_renamed(download: Callable) -> Callable:
    def wrapper(*args, artifact_path: str = "", **kwargs):
        fetched = download(*args, artifact_path=artifact_path, **kwargs)
        if artifact_path == "diffusers":  # in its temporary folder, complete, not yet in place
            hold("model download")
        return fetched

    return wrapper


def latent_cache_half_written(save_file: Callable) -> Callable:
    def wrapper(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        with open(path, "r+b") as partial:  # what a kill mid-write leaves of the temporary file
            partial.truncate(os.path.getsize(path) // 2)
        hold("latent cache write")

    return wrapper


def arm(point: str) -> None:
    if point == "autoencoder publish":  # trained, checkpoint written, nothing logged yet
        stage = flows.autoencoder.AutoencoderStage
        stage.publish = held_before(point, stage.publish)
    elif point == "LDM publish":
        flows.ldm.LDMStage.publish = held_before(point, flows.ldm.LDMStage.publish)
    elif point == "model download":
        mlflow.artifacts.download_artifacts = first_stage_downloaded_not_renamed(mlflow.artifacts.download_artifacts)
    elif point == "latent cache write":
        components.latents.save_file = latent_cache_half_written(components.latents.save_file)


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
