"""Planning a launch: the validation pipeline from the composed config to a ``Job`` and its
``Backend``.

``plan(cfg)`` validates the whole composed tree (general config, cluster, recipe) and
reports every problem at once, before anything is written: each section is parsed with
defaults standing in for its bad values, the backend resolves what it reads from this
machine (``Backend.resolve``), then every rule runs that reads no bad value
(``rules_for``: the shared ones of ``launcher.checks``, the workload's, the secret policy,
then the backend's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter.layout import LOGS_DIR
from adapter.schema import ConfigError, Parsed, Problem, apply_rules, parse_partial, suggest
from launcher import paths
from launcher.backends import available, get_backend
from launcher.backends.base import Backend
from launcher.checks import SHARED_RULES, secret_rules
from launcher.job import ClusterConfig, Job, LaunchRule, Settings
from launcher.workloads import parse_workload
from launcher.workloads.base import Workload


def plan(cfg: dict[str, Any]) -> tuple[Job, Backend]:
    """Validate the composed config and build the job; raises ConfigError with every error
    of every section, rule and backend rule at once (rules whose inputs failed skipped)."""
    cfg = dict(cfg)
    cluster_data = cfg.pop("cluster", None) or {}
    recipe_data = cfg.pop("recipes", None)
    settings = parse_partial(Settings, cfg)
    backend, cluster = _parse_cluster(cluster_data)
    workload, recipe = _parse_recipe(recipe_data)
    problems = [*settings.problems, *cluster.problems, *recipe.problems]
    failed = set(settings.failed | cluster.failed | recipe.failed)
    job = None
    if backend is not None and cluster.instance is not None and workload is not None:
        job = _job(settings.instance, cluster.instance, workload, problems, failed)
        job.resolved = backend.resolve(job)
        problems.extend(apply_rules(rules_for(job, backend), job, failed))
    errors = [p for p in problems if p.is_error]
    if job is None or backend is None or errors:
        raise ConfigError(errors, "the launch config")
    job.warnings = [p for p in problems if not p.is_error]
    return job, backend


def rules_for(job: Job, backend: Backend) -> list[LaunchRule]:
    """Every check of ``job`` on ``backend``, in the order their problems are reported."""
    return [*SHARED_RULES, *job.workload.rules, *secret_rules(backend), *backend.rules]


def _parse_cluster(data: dict[str, Any]) -> tuple[Backend | None, Parsed]:
    cluster_type = data.get("type")
    if cluster_type not in available():
        hint = suggest(str(cluster_type), available())
        message = f"got {cluster_type!r}{hint}; allowed values: {', '.join(available())}"
        return None, Parsed(None, [Problem("cluster.type", message)], frozenset({"cluster"}))
    backend = get_backend(cluster_type)
    return backend, parse_partial(backend.cluster_schema, data, "cluster")


def _parse_recipe(data: Any) -> tuple[Workload | None, Parsed]:
    if data is None:
        problem = Problem("recipes", "no recipe selected; pass recipes=<name>")
        return None, Parsed(None, [problem], frozenset({"recipes"}))
    return parse_workload(data)


def _job(
    settings: Settings,
    cluster: ClusterConfig,
    workload: Workload,
    problems: list[Problem],
    failed: set[str],
) -> Job:
    """The job of the parsed sections; a results dir that can't be resolved is a problem."""
    given = settings.base_results_dir
    base = paths.absolute(given)
    if base is None and "base_results_dir" not in failed:
        failed.add("base_results_dir")
        why = paths.unusable(given) or f"{given!r} can't be made an absolute path"
        problems.append(
            Problem("base_results_dir", f"{why}; pass base_results_dir=<a writable path>")
        )
    run_dir = (base or Path(settings.base_results_dir)) / workload.name
    return Job(
        settings=settings,
        cluster=cluster,
        workload=workload.bind(run_dir, cluster.type),
        run_dir=run_dir,
    )


def create_run_dir(job: Job) -> None:
    """Create the run dir and its ``logs/``, the first thing a launch writes: where the OS
    refuses what the checks could not foresee (e.g. a directory in /proc), a ConfigError
    naming ``base_results_dir``."""
    try:
        (job.run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = Problem(
            "base_results_dir",
            f"can't create the run directory {job.run_dir} ({paths.reason(exc)}); pass "
            "base_results_dir=<a writable path>",
        )
        raise ConfigError([problem], "the launch config") from None
