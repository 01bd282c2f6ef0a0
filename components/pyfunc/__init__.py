"""MLflow pyfunc models, as code (MLflow's "models from code": the file is stored with the
model and run at load time, so loading a registered model never unpickles anything). Each
module ends in ``set_model``; they are passed to ``mlflow.pyfunc.log_model`` by path
(``components.artifacts``), never imported by latentlab itself."""

from pathlib import Path

LDM_PIPELINE = Path(__file__).with_name("ldm_pipeline.py")
AUTOENCODER = Path(__file__).with_name("autoencoder.py")
LDM_TASK = Path(__file__).with_name("ldm_task.py")
PIPELINE_FACTS = "latentlab.json"  # in the pipeline folder: resolution and conditioning mode
