"""The names of a run directory's files and folders that more than one component relies on.

A run directory ``<base_results_dir>/<run.name>/`` is written by the launcher (the recipe,
the per-node script, the launch record and its lock) and by the adapter (metrics,
checkpoints, the exported model); the launcher, the adapter and ``python -m launcher`` all
find them by these names, so each is spelled once, here. Torch-free: the launcher imports it.

The files that one backend alone renders (``<run>.sbatch``, ``pytorchjob.yaml``,
``create_training_job.json``, ...) are named in that backend's ``render`` module.
"""

RECIPE_FILE = "recipe.yaml"
"""The fully resolved recipe: in the run dir (what every rank reads), beside an exported
model and in a checkpoint's assets (what ``adapter.export`` rebuilds the model from)."""
TRAIN_SCRIPT = "train.sh"
"""The per-node command every backend renders into the run dir."""
RECORD_FILE = "launch.json"
"""The launch record ``python -m launcher status|logs|cancel`` reads."""
LOCK_FILE = "launch.lock"
"""Held by the one launch (and local job) writing into the run dir."""
LOGS_DIR = "logs"
"""The job's output (local: ``train.log``; Slurm: one file per job id)."""
CHECKPOINTS_DIR = "checkpoints"
"""Default checkpoint root (``exp_manager.checkpoint_dir`` null): ``step_<N>/`` directories."""
HF_MODEL_DIR = "hf_model"
"""Default directory of the final Hugging Face export."""
MERGED_DIR = "merged"
"""Inside a PEFT export: the base model with the adapter merged in."""
METRICS_FILE = "metrics.jsonl"
"""One JSON line per logged step (rank 0)."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard event files (``exp_manager.create_tensorboard_logger``)."""
