"""SageMaker backend: one training job per launch, created through the ``sagemaker`` SDK (v3).

``resolve`` (``client``) reads what the job takes from this machine once, while planning:
the region, the execution role, the training image (the SDK's PyTorch image when
``container`` is null) and the local data to upload. ``render`` is then pure: it builds
every input of the job (``render.JobSpec``) from the config and that, and writes the
CreateTrainingJob request that ``submit`` will make, ``train.sh`` (the per-instance torchrun
command), ``requirements.txt`` (what the image lacks) and the recipe the job runs, with the
paths its workload reads and writes moved into the container's SageMaker layout:

- data (``model.data.train_dir`` / ``val_dir``) become the ``train`` / ``val`` channels at
  ``/opt/ml/input/data/<channel>``; ``s3://`` URIs are used as they are, local files or
  directories are uploaded under the run's S3 prefix at submission;
- the experiment dir → ``/opt/ml/output/data`` (metrics.jsonl, logs, TensorBoard; uploaded
  as ``output.tar.gz``), checkpoints → ``/opt/ml/checkpoints`` (synced with
  ``checkpoint_s3_uri``, so a restarted or spot-interrupted job resumes), final Hugging Face
  model → ``/opt/ml/model`` (``model.tar.gz``).

``submit`` stages the adapter package (or a custom job's code), the resolved recipe,
``train.sh`` and ``requirements.txt`` as the job's source directory (no git clone at job
start) and calls ``ModelTrainer.train(wait=False)`` with arguments read from the rendered
request (``client.model_trainer``: the request is built once); the SDK uploads the source
and creates the job. The request the SDK actually sent replaces the rendered one in the run
dir. The SDK is imported only by ``client``, lazily: to submit, and to resolve the PyTorch
image when ``container`` is null (≈ 4 s, while planning); ``status``/``logs``/``cancel``
need boto3 only.

Every S3 object of a run lives under ``<output_path>/<base job name>/``: the staged inputs
(``<job>/input/<channel>``), the model (``<job>/output/model.tar.gz``), ``checkpoints/`` and
``tensorboard/``. The job name is the base name plus the submission time
(``YYYYMMDDHHMMSS``), which the dry-run request shows as ``<timestamp>``.

With ``cluster.local_mode=true`` the same request runs on this machine instead
(``client_local``): ModelTrainer in the SDK's local-container mode starts one container of
the local image ``container`` per instance with Docker Compose, local data mounted as
channels, and packs the model into ``<run dir>/sagemaker_local/compressed_artifacts/
model.tar.gz``; ``main.py`` runs it until it ends, and ``status``/``logs``/``cancel`` read the
run dir and the Compose project's containers. What the request changes for it, and only
that, is listed in ``render``'s docstring.
"""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.backends.sm_jobs import client, render, rules
from launcher.backends.sm_jobs.config import SmJobsCluster


class SmJobsBackend(Backend):
    """SageMaker training jobs: one job per launch, created through the SDK's ModelTrainer."""

    type = "sm_jobs"
    cluster_schema = SmJobsCluster
    checks = rules
    renderer = render
    client = client
    cluster_env = ("environment",)
