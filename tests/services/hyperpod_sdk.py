"""The HyperPodPyTorchJob's official model, to validate rendered manifests strictly.

``sagemaker-hyperpod`` (PyPI; the HyperPod CLI and SDK, published by Amazon Web Services,
source github.com/aws/sagemaker-hyperpod-cli) defines ``HyperPodPytorchJob`` as a Pydantic
model of the CRD's spec that rejects unknown fields at every level (``extra="forbid"``). Its
own dependencies (awscli, hydra-core, kr8s, kubernetes, ...) conflict with this project's
pins, so it lives in a venv of its own, made once and cached (``CACHE``): the venv sees
this environment's packages (``--system-site-packages``: pydantic, kubernetes and pyyaml
are all the model needs) and adds the one pinned, hash-checked wheel without its
dependencies. Building it takes ~20 s and 30 MB; ``validation_errors`` runs this file in it.

Run as a script (in that venv), it reads a JSON list of manifests on stdin and prints, for
each, the model's errors as ``path: message`` lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

VERSION = "3.12.0"
REQUIREMENT = (
    f"sagemaker-hyperpod=={VERSION} "
    "--hash=sha256:e1652ccbf64a8fd0f9ca7e1c9564f3980c619e752fb3343591c92e709c975c0a"
)
"""The wheel checked against its published hash (never a look-alike package)."""
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "recipes-launcher"
    / f"sagemaker-hyperpod-{VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
)


class Unavailable(Exception):
    """The venv can't be made here (no package index, no disk): tests skip with this."""


def venv_python() -> Path:
    """The cached venv's interpreter, made first if need be (atomically: a venv half-made
    by an interrupted run is never used)."""
    python = CACHE / "bin" / "python"
    if python.is_file():
        return python
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging = CACHE.with_name(f"{CACHE.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    requirements = staging.with_suffix(".txt")
    try:
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(staging)])
        requirements.write_text(REQUIREMENT + "\n")
        pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--retries=1"]
        _run([*pip, "--no-deps", "--require-hashes", "-r", str(requirements)])
        _run([str(staging / "bin" / "python"), __file__], stdin="[]")
        try:
            staging.rename(CACHE)
        except OSError:  # another run made it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        requirements.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return python


def _run(command: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{command[2:4]}: {exc}") from None
    if done.returncode != 0:
        raise Unavailable(f"{' '.join(command[1:5])} failed: {done.stderr.strip()[-600:]}")
    return done.stdout


def validation_errors(manifests: list[dict[str, Any]]) -> list[list[str]]:
    """For each HyperPodPyTorchJob manifest, what ``HyperPodPytorchJob`` rejects (empty:
    accepted). Raises Unavailable when the model can't be had here."""
    python = venv_python()
    done = subprocess.run(
        [str(python), __file__],
        input=json.dumps(manifests),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


# --- the worker, in the venv --------------------------------------------------------------


def _validate(manifest: dict[str, Any]) -> list[str]:
    import pydantic
    from sagemaker.hyperpod.training import HyperPodPytorchJob

    # The model is the CRD's spec plus metadata; by_name: the manifest's camelCase names
    # (the model's aliases are snake_case).
    data = {**manifest.get("spec", {}), "metadata": manifest.get("metadata", {})}
    try:
        HyperPodPytorchJob.model_validate(data, by_name=True)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # requests' version warning on import
    print(json.dumps([_validate(m) for m in json.loads(sys.stdin.read())]))
