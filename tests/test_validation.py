"""One validation contract for every launch (issue 14).

Every rule returns ``Problem``s (errors and warnings) and changes nothing; every problem of a
launch is reported in one pass (a rule whose inputs failed to parse is skipped, the others
run); what a backend reads from this machine is resolved while planning, so ``render`` is a
pure function of the job; one secret policy holds on every backend. Also: paths and
overrides a user gets wrong are errors naming the key or the override, never tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.config import Recipe
from adapter.schema import ConfigError, Problem, parse
from launcher.compose import compose_config
from launcher.job import Job
from launcher.planning import plan, rules_for
from tests.conftest import REPO, run_main

ROLE = "arn:aws:iam::123456789012:role/RecipesTest"
OTHER_ROLE = "arn:aws:iam::210987654321:role/SomeoneElse"
IMAGE = "registry.example.com/recipes:test"
RUN = "tiny_llama_sft"

CLUSTER = {
    "local": [],
    "slurm": ["cluster=slurm"],
    "k8s": ["cluster=k8s", f"container={IMAGE}"],
    "sm_jobs": [
        "cluster=sm_jobs",
        "instance_type=ml.g5.48xlarge",
        "recipes.trainer.devices=8",
        "recipes.model.global_batch_size=256",
        f"container={IMAGE}",
        "cluster.output_path=s3://llm-bucket/runs",
        f"cluster.role={ROLE}",
        "cluster.region=us-east-1",
    ],
}
"""The demo recipe made valid on each cluster type."""


def planned(results: Path, *overrides: str) -> tuple[Job, object]:
    return plan(compose_config([f"base_results_dir={results}", *overrides]))


def errors(results: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        planned(results, *overrides)
    return [str(p) for p in info.value.problems]


def error_lines(stderr: str) -> list[str]:
    """The ``  - key: message`` lines of a launch's error report."""
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


def has_sdk() -> bool:
    try:
        import sagemaker.train  # noqa: F401
    except ImportError:
        return False
    return True


# --- 3. paths that can't be used are errors, not tracebacks ----------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_results_dir_the_os_refuses_is_an_error_naming_the_key() -> None:
    out = run_main("base_results_dir=/proc/x", "dry_run=true")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (
        "error: the launch config is not valid, found 1 error(s):\n"
        "  - base_results_dir: can't create the run directory /proc/x/tiny_llama_sft (No such "
        "file or directory: /proc/x); pass base_results_dir=<a writable path>\n"
    )


def test_run_dir_that_is_a_file(results: Path) -> None:
    (results / RUN).write_text("not a directory")
    out = run_main(f"base_results_dir={results}", "dry_run=true")
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        f"base_results_dir: the run directory {results / RUN} exists and is not a directory: "
        "remove it, pass base_results_dir=<a writable path> or another recipes.run.name"
    ]
    assert (results / RUN).read_text() == "not a directory"


def test_unknown_home_directory(results: Path) -> None:
    out = run_main('base_results_dir="~no_such_user_x/results"', "dry_run=true")
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        "base_results_dir: '~no_such_user_x/results' can't be read on this machine (Could not "
        "determine home directory); pass base_results_dir=<a writable path>"
    ]


def test_broken_symlink_as_data(results: Path, tmp_path: Path) -> None:
    link = tmp_path / "train.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    out = run_main(
        f"base_results_dir={results}",
        "dry_run=true",
        "recipes.model.data.synthetic=null",
        f"recipes.model.data.train_dir={link}",
    )
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        f"recipes.model.data.train_dir: '{link}' is a broken symbolic link (to "
        f"'{tmp_path / 'gone.jsonl'}'); pass recipes.model.data.train_dir=<an existing file or "
        "directory>"
    ]
    assert not any(results.iterdir())


def unprivileged() -> list[str]:
    """A prefix running a command without root's right to ignore file permissions (a user
    namespace when we are root), or skips the test where that can't be done."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "true"]).returncode:
        pytest.skip("running as root and `unshare -U` (a user namespace) is not available")
    return ["unshare", "-U"]


def test_paths_behind_permissions_are_errors(results: Path, tmp_path: Path) -> None:
    """A directory we may not search (data behind it: stat raises EACCES) or not write."""
    locked = tmp_path / "locked"
    (locked / "data").mkdir(parents=True)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    locked.chmod(0o000)
    read_only.chmod(0o555)
    try:
        argv = [
            *unprivileged(),
            sys.executable,
            str(REPO / "main.py"),
            f"base_results_dir={read_only}/results",
            "dry_run=true",
            "recipes.model.data.synthetic=null",
            f"recipes.model.data.train_dir={locked}/data/train.jsonl",
        ]
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
        read_only.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert error_lines(out.stderr) == [
        f"base_results_dir: '{read_only}/results' is not writable ({read_only} is not a "
        "writable directory); pass base_results_dir=<a writable path>",
        f"recipes.model.data.train_dir: '{locked}/data/train.jsonl' can't be read on this "
        f"machine (Permission denied: {locked}/data/train.jsonl); pass "
        "recipes.model.data.train_dir=<an existing file or directory>",
    ]


def test_read_only_file_system(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {mount}"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("can't mount a read-only tmpfs here (needs `unshare -rm`)")
    launch = f"{sys.executable} {REPO / 'main.py'} base_results_dir={mount}/results dry_run=true"
    script = f"mount -t tmpfs -o ro none {mount} && exec {launch}"
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        f"base_results_dir: '{mount}/results' is not writable ({mount} is not a writable "
        "directory); pass base_results_dir=<a writable path>"
    ]


# --- 4. model_type is checked at launch, without torch ---------------------------------------


@pytest.mark.parametrize("cluster", sorted(CLUSTER))
def test_misspelled_model_type_is_an_error_on_every_cluster(cluster: str, tmp_path: Path) -> None:
    assert errors(tmp_path, *CLUSTER[cluster], "recipes.model.model_type=lama") == [
        "recipes.model.model_type: unknown 'lama' (did you mean `llama`?); known families: "
        "chatglm, gemma3, glm, gpt2, gpt_oss, llama, mistral, mixtral, mpt, qwen2, qwen3, "
        "qwen3_moe (a pretrained model of another type works through "
        "model.hf_model_name_or_path)"
    ]


def test_families_a_random_init_model_cannot_use(tmp_path: Path) -> None:
    assert errors(tmp_path, "recipes.model.model_type=chatglm") == [
        "recipes.model.model_type: got 'chatglm', which can't be built from random init: its "
        "code lives in the checkpoint repo; set model.hf_model_name_or_path (e.g. "
        "THUDM/chatglm-6b) and model.trust_remote_code=true"
    ]
    assert errors(tmp_path, "recipes=tiny_gpt2_sft", "+recipes.model.num_key_value_heads=2") == [
        "recipes.model.num_key_value_heads: doesn't apply to model_type=gpt2; remove it"
    ]


def test_a_pretrained_model_of_another_type_is_not_checked(tmp_path: Path) -> None:
    """Its checkpoint's config decides the family (the adapter's generic path)."""
    job, _ = planned(
        tmp_path,
        "recipes.model.model_type=qwen3",
        "recipes.model.hf_model_name_or_path=Qwen/Qwen3-0.6B",
    )
    assert job.workload.recipe.model.model_type == "qwen3"


def test_family_names_have_one_torch_free_home() -> None:
    code = (
        "import sys, adapter.families, adapter.config, launcher.job; "
        "print('torch' in sys.modules, sorted(adapter.families.FAMILIES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(" ", 1) == [
        "False",
        "['chatglm', 'gemma3', 'glm', 'gpt2', 'gpt_oss', 'llama', 'mistral', 'mixtral', 'mpt', "
        "'qwen2', 'qwen3', 'qwen3_moe']\n",
    ]
    import adapter.families
    import adapter.models

    assert adapter.models.FAMILIES is adapter.families.FAMILIES


# --- 5. every problem in one pass ------------------------------------------------------------


def test_bad_field_cross_field_rule_and_backend_rule_are_reported_together(results: Path) -> None:
    out = run_main(
        f"base_results_dir={results}",
        "dry_run=true",
        "recipes.trainer.log_every_n_steps=0",  # a field
        "recipes.model.global_batch_size=3",  # the recipe's rule (batch vs ranks)
        "recipes.trainer.num_nodes=2",  # the local backend's rule
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: the launch config is not valid, found 3 error(s):",
        "  - recipes.trainer.log_every_n_steps: got 0; must be ≥ 1",
        "  - recipes.model.global_batch_size: got 3; must be a multiple of micro batch × devices "
        "× nodes = 32 × 1 × 2 = 64 (e.g. 64)",
        "  - recipes.trainer.num_nodes: got 2; the local cluster has one node: use "
        "cluster=slurm|k8s|sm_jobs for multi-node jobs",
    ]
    assert not any(results.iterdir())


def test_a_rule_whose_input_failed_is_skipped(tmp_path: Path) -> None:
    """The batch rule reads trainer.devices: with devices unparsable, its verdict would be
    about the default, so it doesn't run."""
    assert errors(tmp_path, "recipes.trainer.devices=two", "recipes.model.global_batch_size=3") == [
        "recipes.trainer.devices: expected int, got 'two'"
    ]


def test_cluster_field_cluster_rule_and_backend_rule_together(tmp_path: Path) -> None:
    assert errors(
        tmp_path,
        "cluster=slurm",
        "cluster.partition=[a,b]",
        "cluster.mem=lots",
        "cluster.gpus_per_node=8",
    ) == [
        "cluster.partition: expected str, got ['a', 'b']",
        "cluster.mem: got 'lots'; expected megabytes or e.g. 200G, 0 = all",
        "cluster.gpus_per_node: got 8 but this job runs on CPU (instance_type=null, "
        "recipes.trainer.accelerator=auto); set cluster.gpus_per_node=null, or a GPU "
        "instance_type / recipes.trainer.accelerator=gpu",
    ]


def test_data_rules_do_not_stop_at_the_first_problem() -> None:
    data = {"dataset_type": "alpaca", "prompt_template": "Q: {prompt}"}
    _, problems = parse(Recipe, {"trainer": {"max_steps": 1}, "model": {"data": data}})
    assert [str(p) for p in problems] == [
        "model.data.train_dir: is required (a file or directory), or set model.data.synthetic",
        "model.data.prompt_template: applies to dataset_type=prompt_response, preference and "
        "prompt_answer only (this is alpaca, which has its own template); remove it",
        "model.hf_model_name_or_path: is required unless the architecture is given "
        "(num_hidden_layers, hidden_size, ...) for a random-init model",
    ]


# --- 6. a checkpoint to resume from is checked where this machine sees it ------------------


@pytest.mark.parametrize(
    ("cluster", "checked"),
    [
        (["cluster=local"], True),
        (["cluster=slurm"], True),  # bare metal: the nodes share this file system
        (["cluster=slurm", f"container={IMAGE}"], False),  # a path in the container
        (CLUSTER["k8s"], False),  # a path in the pods
    ],
)
def test_missing_resume_checkpoint(cluster: list[str], checked: bool, tmp_path: Path) -> None:
    missing = tmp_path / "checkpoints" / "step_8"
    resume = f"recipes.exp_manager.resume_from_checkpoint={missing}"
    if not checked:
        planned(tmp_path / "results", *cluster, resume)
        return
    assert errors(tmp_path / "results", *cluster, resume) == [
        f"recipes.exp_manager.resume_from_checkpoint: '{missing}' does not exist; pass the "
        "checkpoint to resume from (a step_<N> directory, or a checkpoint directory holding "
        "them), or recipes.exp_manager.resume_from_checkpoint=null"
    ]
    missing.mkdir(parents=True)
    planned(tmp_path / "results", *cluster, resume)


# --- 7. an override that can't be parsed is named --------------------------------------------

FORMS = (
    "Overrides are key=value, +key=value (adds a key the config lacks) and ~key (removes one); "
    "a list is key=[1,2], and a value with spaces, commas, brackets or '~' is quoted for Hydra "
    """inside the shell's quotes: 'key="a, b"'. Grammar: """
    "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"
)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("recipes.trainer.max_steps=[1,2", "no viable alternative at input '[1,2'"),
        ("base_results_dir=~/runs", "token recognition error at: '~' (column 18)"),
        ("recipes", "no '=' (an override sets a key to a value)"),
    ],
)
def test_unparsable_override_is_named_with_the_forms(override: str, reason: str) -> None:
    out = run_main("dry_run=true", override)
    assert out.returncode == 2
    assert out.stderr == f"error: can't parse the override {override!r}: {reason}\n{FORMS}\n"


# --- the contract: rules change nothing, render is a function of the job --------------------


@pytest.mark.parametrize("cluster", sorted(CLUSTER))
def test_rules_return_problems_and_change_nothing(cluster: str, tmp_path: Path) -> None:
    """Run every rule again on the planned job: same problems, same job (the k8s mount and
    the precision warnings used to be appended to ``job.warnings`` by validate)."""
    from adapter.schema import apply_rules

    job, backend = planned(tmp_path, *CLUSTER[cluster], "recipes.trainer.precision=bf16")
    before = repr(job)
    again = apply_rules(rules_for(job, backend), job)
    assert all(isinstance(p, Problem) for p in again)
    assert [p for p in again if not p.is_error] == job.warnings
    assert repr(job) == before


CUSTOM = [
    "recipes=custom_torchrun",
    "recipes.script.entry_point=check_world.py",
    "recipes.trainer.num_nodes=1",
    "recipes.trainer.devices=2",
    "recipes.trainer.accelerator=cpu",
]
"""A custom job whose code is the launch directory (source_dir null): it runs from there."""
SM_JOBS_FROM_ENV = [
    *[o for o in CLUSTER["sm_jobs"] if not o.startswith(("cluster.role", "cluster.region"))],
    "cluster.role=null",
    "cluster.region=null",
]
"""Role and region from the environment (SAGEMAKER_ROLE, AWS_REGION)."""
PURITY = {
    "local_one_rank": [],
    "local_torchrun": ["recipes.trainer.devices=2", "recipes.model.train_batch_size=16"],
    "local_custom": CUSTOM,
    "slurm": CLUSTER["slurm"],
    "slurm_custom": [*CLUSTER["slurm"], *CUSTOM],
    "k8s": CLUSTER["k8s"],
    "k8s_hyperpod_elastic": [
        *CLUSTER["k8s"],
        "cluster.use_hyperpod_pytorch_job=true",
        "recipes.trainer.num_nodes=2",
        "+recipes.elastic_policy={is_elastic: true, min_nodes: 1, max_nodes: 3}",
        "recipes.model.global_batch_size=192",
    ],
    "sm_jobs": SM_JOBS_FROM_ENV,
    "sm_jobs_sdk_image": [o for o in SM_JOBS_FROM_ENV if not o.startswith("container=")],
}


def launch_environment(monkeypatch: pytest.MonkeyPatch, code: Path) -> None:
    """Where the launch runs: the custom job's code in the working directory, AWS settings."""
    monkeypatch.chdir(code)
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def change_environment(monkeypatch: pytest.MonkeyPatch, elsewhere: Path) -> None:
    """Everything a render could read from the machine, changed: directory, interpreter,
    PATH (a GPU and launchers appear), home, AWS region and role."""
    tools = elsewhere / "bin"
    tools.mkdir(parents=True)
    for tool in ("nvidia-smi", "torchrun", "python"):
        (tools / tool).write_text("#!/bin/sh\nexit 0\n")
        (tools / tool).chmod(0o755)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "executable", str(tools / "python"))
    monkeypatch.setenv("HOME", str(elsewhere))
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("SAGEMAKER_ROLE", OTHER_ROLE)


def code_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(REPO / "tests/fixtures/custom/check_world.py", code)
    return code


@pytest.mark.parametrize("case", sorted(PURITY))
def test_render_is_a_function_of_the_job(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case == "sm_jobs_sdk_image" and not has_sdk():
        pytest.skip("needs the sagemaker SDK to resolve the image")
    launch_environment(monkeypatch, code_dir(tmp_path))
    job, backend = planned(tmp_path / "results", *PURITY[case])
    first = backend.render(job)
    change_environment(monkeypatch, tmp_path / "elsewhere")
    assert backend.render(job) == first
    assert not (tmp_path / "results").exists()


RENDER_WATCH = """
import json, sys
from launcher.compose import compose_config
from launcher.planning import plan

job, backend = plan(compose_config(json.loads(sys.argv[1])))
for name in [m for m in sys.modules if m.split(".")[0] == "sagemaker"]:
    sys.modules[name] = None  # render must not need the SDK: importing it now fails
from launcher.backends.sm_jobs.client import _pytorch_image

_pytorch_image.cache_clear()
WATCHED = {"open", "import", "os.listdir", "os.scandir", "os.chdir", "os.system",
           "subprocess.Popen", "socket.connect", "socket.getaddrinfo", "shutil.copyfile"}
seen = []
sys.addaudithook(lambda event, args: event in WATCHED and seen.append(f"{event} {args[:1]}"))
backend.render(job)
print(json.dumps(seen))
"""


@pytest.mark.parametrize("case", sorted(PURITY))
def test_render_does_no_io(case: str, tmp_path: Path) -> None:
    """No file opened or listed, no module imported (the SDK is blocked), no process, no
    network while rendering; audit hooks see each of these."""
    if case == "sm_jobs_sdk_image" and not has_sdk():
        pytest.skip("needs the sagemaker SDK to resolve the image")
    code = code_dir(tmp_path)
    overrides = [f"base_results_dir={tmp_path / 'results'}", *PURITY[case]]
    aws_config = tmp_path / "aws_config"
    aws_config.write_text("[default]\nregion = us-east-1\n")  # read by botocore
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    env |= {"PYTHONPATH": str(REPO), "SAGEMAKER_ROLE": ROLE, "AWS_CONFIG_FILE": str(aws_config)}
    out = subprocess.run(
        [sys.executable, "-c", RENDER_WATCH, json.dumps(overrides)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# --- the contract: one secret policy ----------------------------------------------------------

SECRETS = {
    "local": (
        ["+env_vars.HF_TOKEN=hf_x"],
        [
            "env_vars.HF_TOKEN: looks like a secret and would be written in plain text into "
            "train.sh; remove it and export HF_TOKEN in the shell that runs main.py (the job "
            "inherits that environment)"
        ],
    ),
    "slurm": (
        ["+env_vars.HF_TOKEN=hf_x"],
        [
            "env_vars.HF_TOKEN: looks like a secret and would be written in plain text into "
            f"{RUN}.sbatch; remove it and export HF_TOKEN in the shell that runs main.py (the "
            "job inherits that environment)"
        ],
    ),
    "k8s": (
        ["+env_vars.HF_TOKEN=hf_x", "+cluster.env.WANDB_API_KEY=k"],
        [
            f"{key}: looks like a secret and would be written in plain text into "
            "pytorchjob.yaml; store it in a Secret and list it under cluster.secret_env"
            for key in ("env_vars.HF_TOKEN", "cluster.env.WANDB_API_KEY")
        ],
    ),
    "sm_jobs": (
        ["+env_vars.HF_TOKEN=hf_x", "++cluster.environment={WANDB_API_KEY: k}"],
        [
            f"{key}.{name}: looks like a secret and would be written in plain text into "
            "create_training_job.json and the job's Environment, which anyone allowed to "
            "DescribeTrainingJob can read; remove it: a gated Hugging Face model can be "
            "uploaded to S3 and read from a cluster.inputs channel (no token in the job), and "
            f"a custom script can read {name} from AWS Secrets Manager (with an execution role "
            "allowed secretsmanager:GetSecretValue)"
            for key, name in (("env_vars", "HF_TOKEN"), ("cluster.environment", "WANDB_API_KEY"))
        ],
    ),
}


@pytest.mark.parametrize("cluster", sorted(SECRETS))
def test_a_secret_in_a_rendered_file_is_an_error_on_every_backend(
    cluster: str, tmp_path: Path
) -> None:
    overrides, expected = SECRETS[cluster]
    assert errors(tmp_path, *CLUSTER[cluster], *overrides) == expected
    assert not any("hf_x" in line for line in expected)


@pytest.mark.slow
def test_local_job_inherits_the_environment_main_py_runs_in(tmp_path: Path) -> None:
    """What the local secret message promises: export it in the shell, the ranks see it."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "show_env.py").write_text(
        "import os, sys\nopen(sys.argv[1], 'w').write(os.environ.get('MY_API_TOKEN', '<unset>'))\n"
    )
    seen = tmp_path / "seen.txt"
    done = run_main(
        f"base_results_dir={tmp_path / 'results'}",
        *CUSTOM,
        "recipes.trainer.devices=1",
        f"recipes.script.source_dir={code}",
        "recipes.script.entry_point=show_env.py",
        f"recipes.script.args=[{seen}]",
        env={"MY_API_TOKEN": "s3cret-value"},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert seen.read_text() == "s3cret-value"
    written = "".join(p.read_text() for p in (tmp_path / "results/custom_torchrun").glob("*.*"))
    assert "s3cret-value" not in written
