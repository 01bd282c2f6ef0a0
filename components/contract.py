"""The names other programs and people rely on: the MLflow tags on every run and the registered
models (DESIGN.md, "interface contract"). Saved MLflow UI views, outside checks, older runs and
notebooks read these; renaming one breaks them. Each name is used through this module only.
"""

# --- on every run ---------------------------------------------------------------------------------
TAG_STAGE = "latentlab.stage"  # data | autoencoder | ldm | evaluate | sweep | reproduce
TAG_RUN_KEY = "latentlab.run_key"  # the run's identity (``components.runs.run_key``)
TAG_DATA_VERSION = "latentlab.data_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "latentlab.git_dirty"
TAG_MACHINE = "latentlab.machine"  # processor, cores, memory, GPU: what the run's timings were measured on

# --- on per-factor runs ---------------------------------------------------------------------------
TAG_FACTOR = "latentlab.factor"
TAG_SEED = "latentlab.seed"  # on training runs
TAG_PRECISION = "latentlab.precision"  # on training runs: the precision it trained in
TAG_PRECISION_RULE = "latentlab.precision_rule"  # and which rule chose it (``components.precision``)
TAG_AE_RUN = "latentlab.ae_run_id"  # on LDM and evaluate runs of an autoencoder (not pixel space)
TAG_FIRST_STAGE = "latentlab.first_stage"  # on LDM and evaluate runs: ``FirstStageRef.id``
TAG_LDM_RUN = "latentlab.ldm_run_id"  # on evaluate runs
TAG_LATENT_SHAPE = "latentlab.latent_shape"
TAG_TASK = "latentlab.task"  # on LDM, evaluate and sweep runs: generate | superres | inpaint (``ldm.task``)
TAG_PERCEPTUAL = "latentlab.perceptual"

# --- on runs that compute FID -----------------------------------------------------------------------
TAG_FID_EXTRACTOR = "latentlab.fid_extractor"  # which network produced the features
TAG_REFERENCE_SPLIT = "latentlab.reference_split"  # the real images FIDs were computed against
TAG_SMALL_SAMPLE = "latentlab.small_sample"
TAG_SMALL_SAMPLE_NOTE = "latentlab.small_sample_note"
TAG_ROLE = "latentlab.role"  # "feature-extractor" on the domain extractor's evaluate run

# --- on sweep and reproduce runs ------------------------------------------------------------------
TAG_BUDGET = "latentlab.budget"
TAG_CHANGED_PARAMS = "latentlab.changed_params"  # on sweeps: JSON {key: value} differing from params/default.yaml
FACTOR_TAG_PREFIX = "latentlab.sweep.f"  # + f (+ ".r<repeat>"): the runs that answer for a factor
TAG_REPRODUCES = "latentlab.reproduces"
TAG_REPRODUCED_STAGE = "latentlab.reproduced_stage"
TAG_REPRODUCED_RUN = "latentlab.reproduced_run_id"
TAG_WITHIN_TOLERANCE = "latentlab.within_tolerance"

# --- registered models ----------------------------------------------------------------------------
LDM_MODEL = "ldm"  # one version per LDM run with a pipeline (f > 1); aliases f<f> and best
# An LDM given an image registers under its task's name (every f: a pyfunc of latentlab's own model)
LDM_MODELS = {"generate": LDM_MODEL, "superres": "ldm-superres", "inpaint": "ldm-inpaint"}

# --- metrics of each task (``ldm.task``) ---------------------------------------------------------
# What an evaluate run of each task measures besides FID/KID at the training size (``tasks.task_scores``;
# generation: ``evaluation.kid_at_larger_size``): (name, label, higher is better)
TASK_METRICS = {
    "generate": (("kid_2x", "KID of crops at 2x size", False),),
    "superres": (
        ("sr_psnr", "PSNR (dB)", True),
        ("sr_ssim", "SSIM", True),
        ("sr_psnr_bicubic", "bicubic PSNR (dB)", True),
    ),
    "inpaint": (
        ("mask_l1", "L1 in holes", False),
        ("mask_psnr", "PSNR in holes (dB)", True),
        ("mask_l1_mean_fill", "mean-colour fill L1", False),
        ("mask_psnr_mean_fill", "mean-colour fill PSNR (dB)", True),
    ),
}
TASK_TITLES = {"generate": "generation", "superres": "super-resolution", "inpaint": "inpainting"}
