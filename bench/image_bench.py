"""The training image: build time (clean, cached), size, and start-up in a container.

    python -m bench image              (or: python -m bench.image_bench [--quick])

- **Clean build**: ``docker/build.sh --cpu`` as on a new CI machine: the Debian base made
  by debootstrap, every wheel downloaded by pip (no pip cache, an empty wheel cache), and
  ``docker build`` on a base no layer cache knows. It runs under its own base and image tags,
  so the host's images and their cache are left as they are (debootstrap itself is already
  installed: that is ~10 s more on a new machine). Not with ``--quick``.
- **Rebuilds**: the same build again with nothing changed, and after an edit of an adapter
  source file (a copy of the tree with a comment added to ``adapter/train.py``).
- **Size** of the image and of its base (``docker image inspect``).
- **Start-up**: command → the first ``step 1/`` line, the same resolved recipe (the demo's
  tiny Llama, one step, one rank) run as ``docker run --rm --network host <image> python -m
  adapter.train recipe.yaml`` and as ``python -m adapter.train recipe.yaml`` on this host,
  in rotated order, after waiting for a quiet machine. The container side adds Docker's
  start-up and the image's own Python and packages (same versions as this host's).

Without a Docker daemon the result says why and holds no figures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Options,
    median,
    ratio,
    run_timed,
    say,
    stats,
    wait_for_quiet,
    write_result,
)
from bench.report import Row, fmt

NAME = "image"
FIRST_STEP = "step 1/"
REPEATS = 3
CLEAN_BUILD_GOAL_S = 300
RECIPE_OVERRIDES = (
    "recipes.trainer.max_steps=1",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.trainer.accelerator=cpu",
    "recipes.model.data.num_synthetic_samples=400",
    "recipes.exp_manager.auto_resume=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    "recipes.exp_manager.checkpoint_callback_params.save_last=false",
    "recipes.exp_manager.export_full_model.save_last=false",
)


def docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed (bash tests/services/docker.sh up)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    return None if info.returncode == 0 else "no Docker daemon answers (docker.sh up)"


def build(tree: Path, env: dict[str, str], tag: str) -> dict[str, Any]:
    """``<tree>/docker/build.sh --cpu --tag <tag>``: wall time and the image it made."""
    timed = run_timed(["bash", str(tree / "docker" / "build.sh"), "--cpu", "--tag", tag], env=env)
    timed.check(f"docker/build.sh --cpu --tag {tag}")
    return {"wall_s": round(timed.wall_s, 2), "image_id": image_field(tag, "{{.Id}}")}


def image_field(tag: str, template: str) -> str:
    out = subprocess.run(
        ["docker", "image", "inspect", "--format", template, tag],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def edited_tree(work: Path) -> Path:
    """A copy of what the build reads, with a comment added to one adapter source file."""
    tree = work / "tree"
    shutil.copytree(REPO / "docker", tree / "docker")
    shutil.copytree(REPO / "adapter", tree / "adapter", ignore=shutil.ignore_patterns("__py*"))
    with open(tree / "adapter" / "train.py", "a") as source:
        source.write(f"# edited by bench/image_bench.py at {time.time()}\n")
    return tree


def remove_images(tag: str, leftovers: list[str], base: str | None) -> None:
    """Remove the bench's own images: its tag, the images that tag no longer names (left
    untagged by a rebuild; never one that another tag still names), then its base."""
    subprocess.run(["docker", "rmi", tag], capture_output=True)
    for image_id in leftovers:
        tags = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{len .RepoTags}}", image_id],
            capture_output=True,
            text=True,
        )
        if tags.returncode == 0 and tags.stdout.strip() == "0":
            subprocess.run(["docker", "rmi", image_id], capture_output=True)
    if base is not None:
        subprocess.run(["docker", "rmi", base], capture_output=True)


def build_times(work: Path, quick: bool) -> dict[str, Any]:
    """Clean (unless ``quick``), unchanged and source-change builds under the bench's tags."""
    suffix = f"bench-{os.getpid()}"
    base, tag = f"recipes-base:{suffix}", f"recipes-train:{suffix}"
    env = {
        "RECIPES_BASE_IMAGE": base,
        "RECIPES_DOCKER_CACHE": str(work / "cache"),
        "PIP_NO_CACHE_DIR": "1",
    }
    if quick:  # the host's base and wheels: no clean build
        env = {"RECIPES_BASE_IMAGE": "recipes-base:bookworm"}
    built: dict[str, Any] = {}
    try:
        if not quick:
            say("image: clean build (minutes)")
            built["clean"] = build(REPO, env, tag)
        built["unchanged"] = build(REPO, env, tag)
        say("image: rebuild after an adapter source change")
        built["source_change"] = build(edited_tree(work), env, tag)
        built["size_bytes"] = int(image_field(tag, "{{.Size}}"))
        built["base_size_bytes"] = int(image_field(env["RECIPES_BASE_IMAGE"], "{{.Size}}"))
    finally:
        leftovers = [b["image_id"] for b in built.values() if isinstance(b, dict)]
        remove_images(tag, leftovers, None if quick else base)
    return built


def startup_commands(work: Path, image: str) -> dict[str, list[str]]:
    """The same resolved recipe in a container of ``image`` and on this host."""
    results = work / "results"
    dry_run = [
        sys.executable,
        "main.py",
        f"base_results_dir={results}",
        "recipes.run.name=bench_image",
        "dry_run=true",
        *RECIPE_OVERRIDES,
    ]
    run_timed(dry_run).check("dry run for the recipe")
    recipe = str(results / "bench_image" / "recipe.yaml")
    docker = [
        "docker",
        "run",
        "--rm",
        "--network",
        "host",
        "--user",
        f"{os.getuid()}:{os.getgid()}",
    ]
    mount = ["-v", f"{results}:{results}", "-e", "OMP_NUM_THREADS", "-e", "PYTHONUNBUFFERED=1"]
    return {
        "container": [*docker, *mount, image, "python", "-m", "adapter.train", recipe],
        "bare_metal": [sys.executable, "-m", "adapter.train", recipe],
    }


def startup(work: Path, image: str, repeats: int, quick: bool) -> dict[str, Any]:
    commands = startup_commands(work, image)
    first: dict[str, list[float]] = {}
    idle: dict[str, list[float]] = {}
    docker_true: list[float] = []
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    for rep in range(repeats):
        names = list(commands)[rep % 2 :] + list(commands)[: rep % 2]
        for name in names:
            if not quick:
                idle.setdefault(name, []).append(wait_for_quiet())
            timed = run_timed(commands[name], env=env, watch=(FIRST_STEP,)).check(name)
            if FIRST_STEP not in timed.marks:
                raise RuntimeError(f"{name}: no {FIRST_STEP!r} line in its output")
            first.setdefault(name, []).append(round(timed.marks[FIRST_STEP], 3))
        bare = run_timed(["docker", "run", "--rm", "--network", "host", image, "true"])
        docker_true.append(round(bare.check("docker run true").wall_s, 3))
        figures = ", ".join(f"{n} {v[-1]:.1f} s" for n, v in first.items())
        say(f"image: rep {rep + 1}/{repeats}: {figures}")
    return {
        "first_step_s": {name: {"samples": v, **stats(v)} for name, v in first.items()},
        "docker_run_true_s": {"samples": docker_true, **stats(docker_true)},
        "ratio": ratio(median(first["bare_metal"]), median(first["container"])),
        "idle_before": idle,
        "commands": {n: " ".join(c).replace(str(work), "<tmp>") for n, c in commands.items()},
    }


def run(options: Options) -> dict[str, Any]:
    problem = docker_problem()
    settings = {"repeats": options.repeat(REPEATS), "recipe": "tiny_llama_sft, 1 step"}
    if problem:
        say(f"image: not run: {problem}")
        return write_result(options, NAME, settings, {"not_run": problem})
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        work = Path(tmp)
        builds = build_times(work, options.quick)
        image = "recipes-train:cpu"  # the host's image, brought up to date, for the start-up
        image_id = build(REPO, {}, image)["image_id"]
        started = startup(work, image, settings["repeats"], options.quick)
        data = {"builds": builds, "startup": started | {"image_id": image_id}}
    return write_result(options, NAME, settings, data)


def gigabytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e9:.2f} GB"


def summarize(result: dict[str, Any]) -> list[Row]:
    if "not_run" in result:
        return [
            Row("image: build and start-up of the training image", f"not run: {result['not_run']}")
        ]
    builds, start = result["builds"], result["startup"]
    edited, unchanged = builds["source_change"]["wall_s"], builds["unchanged"]["wall_s"]
    size, base = gigabytes(builds["size_bytes"]), gigabytes(builds["base_size_bytes"])
    rows = []
    clean = builds.get("clean")
    if clean:
        rows.append(
            Row(
                "image: clean build of the CPU image (`docker/build.sh --cpu`: debootstrap "
                "base, wheels, `docker build`), as on a new machine",
                f"{fmt(clean['wall_s'], 0)} s",
                goal=f"≤ {CLEAN_BUILD_GOAL_S} s",
                met=clean["wall_s"] <= CLEAN_BUILD_GOAL_S,
            )
        )
    rows += [
        Row(
            "image: rebuild after an edit of adapter/ (Docker's layer cache); unchanged tree",
            f"{fmt(edited, 1)} s; {fmt(unchanged, 1)} s",
        ),
        Row(
            "image: size of recipes-train:cpu (torch CPU, transformers, peft, pyarrow, "
            "tensorboard; no launcher dependencies)",
            f"{size} (Debian base {base})",
        ),
    ]
    first = start["first_step_s"]
    rows.append(
        Row(
            "image: command → first training step, tiny Llama, one rank: `docker run ... "
            "python -m adapter.train` vs the same on bare metal "
            f"(`docker run <image> true`: {fmt(start['docker_run_true_s']['median'], 2)} s)",
            f"{fmt(first['container']['median'], 2)} s (container)",
            f"{fmt(first['bare_metal']['median'], 2)} s (bare metal)",
            f"{start['ratio']:.2f}×",
        )
    )
    return rows


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))
