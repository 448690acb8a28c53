"""The recipe schema: every validation rule reports the full key, the bad value and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapter.config import Recipe, load_recipe
from adapter.durations import parse_duration, parse_time_limit
from adapter.schema import ConfigError, parse

BASE = {
    "run": {"name": "t"},
    "trainer": {"max_steps": 5},
    "model": {"num_hidden_layers": 1, "data": {"synthetic": "arithmetic"}},
}


def problems(data: dict) -> list[str]:
    _, found = parse(Recipe, data)
    return [str(p) for p in found]


def with_(path: str, value: object) -> dict:
    """BASE with one nested key set (``a.b.c``)."""
    import copy

    data = copy.deepcopy(BASE)
    node = data
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return data


def test_valid_recipe_has_no_problems() -> None:
    recipe = load_recipe(BASE)
    assert recipe.trainer.max_steps == 5
    assert recipe.model.optim.lr == 1e-4


def test_unknown_key_suggests_the_closest() -> None:
    [line] = problems(with_("trainer.max_step", 3))
    assert line.startswith("trainer.max_step: unknown key (did you mean `max_steps`?)")
    assert "allowed keys here: accelerator, collective_timeout_s, devices," in line


def test_wrong_type_names_key_value_and_type() -> None:
    assert problems(with_("trainer.devices", "two")) == ["trainer.devices: expected int, got 'two'"]


def test_bool_is_not_an_int() -> None:
    assert problems(with_("trainer.devices", True)) == ["trainer.devices: expected int, got True"]


def test_out_of_range() -> None:
    assert problems(with_("model.optim.lr", 0)) == ["model.optim.lr: got 0.0; must be > 0.0"]
    assert problems(with_("model.peft.dropout", 1.0)) == [
        "model.peft.dropout: got 1.0; must be < 1.0"
    ]


def test_enum_lists_allowed_values() -> None:
    [line] = problems(with_("model.sharding_strategy", "full"))
    assert line == (
        "model.sharding_strategy: got 'full' (did you mean `full_shard`?); allowed values: "
        "'full_shard', 'hybrid_shard', 'shard_grad_op', 'no_shard'"
    )


def test_precision_accepts_yaml_int_32() -> None:
    assert load_recipe(with_("trainer.precision", 32)).trainer.precision == "32"


def test_all_errors_reported_at_once() -> None:
    data = with_("trainer.max_step", 3)
    data["model"]["optim"] = {"lr": -1, "betaz": [0.9, 0.9]}
    data["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        load_recipe(data, "my.yaml")
    keys = sorted(p.key for p in info.value.problems)
    assert keys == ["bogus", "model.optim.betaz", "model.optim.lr", "trainer.max_step"]
    assert str(info.value).startswith("my.yaml is not valid, found 4 error(s):")


def test_global_batch_must_match_micro_batch_times_ranks() -> None:
    data = with_("model.global_batch_size", 30)
    data["model"]["train_batch_size"] = 4
    data["trainer"]["devices"] = 2
    assert problems(data) == [
        "model.global_batch_size: got 30; must be a multiple of micro batch × devices × "
        "nodes = 4 × 2 × 1 = 8 (e.g. 32)"
    ]
    data["model"]["global_batch_size"] = 32
    assert load_recipe(data).grad_accum_steps == 4


def test_shard_degree_divides_world_size() -> None:
    data = with_("model.shard_degree", 3)
    data["model"]["sharding_strategy"] = "hybrid_shard"
    data["trainer"].update(devices=4, num_nodes=2)
    assert problems(data) == [
        "model.shard_degree: got 3; must divide the world size devices × nodes = 8"
    ]


def test_context_longer_than_positions() -> None:
    data = with_("model.max_position_embeddings", 64)
    data["model"]["max_context_width"] = 128
    [line] = problems(data)
    assert line.startswith("model.max_context_width: got 128, more than the model's")


def test_needs_weights_or_architecture() -> None:
    data = with_("model.num_hidden_layers", None)
    [line] = problems(data)
    assert line.startswith("model.hf_model_name_or_path: is required unless the architecture")


def test_training_length_required() -> None:
    assert problems(with_("trainer.max_steps", -1)) == [
        "trainer.max_steps: set trainer.max_steps or trainer.max_epochs"
    ]


def test_bad_duration_and_time_limit() -> None:
    data = with_("trainer.val_check_interval", "2 epochs")
    data["run"]["time_limit"] = "90 minutes"
    found = problems(data)
    assert len(found) == 2
    assert found[0].startswith("run.time_limit: got '90 minutes'; expected [D-]HH:MM:SS")
    assert found[1].startswith("trainer.val_check_interval: got '2 epochs'; use steps")


def test_durations() -> None:
    assert parse_duration("2ep", steps_per_epoch=50) == 100
    assert parse_duration("30ba", steps_per_epoch=50) == 30
    assert parse_duration(7, steps_per_epoch=50) == 7
    assert parse_time_limit("1-02:03:04") == 93784
    assert parse_time_limit("00:30:00") == 1800
    assert parse_time_limit("1:75:00") is None


def test_schema_import_does_not_import_torch() -> None:
    code = "import adapter.config, launcher.job, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def offload(cpu_offload: bool | None, offload_activations: bool | None) -> dict:
    data = with_("model.cpu_offload", cpu_offload)
    data["model"]["offload_activations"] = offload_activations
    return data


@pytest.mark.parametrize(
    ("cpu_offload", "offload_activations", "resolved"),
    [
        (None, None, False),
        (True, None, True),
        (None, True, True),
        (False, None, False),
        (True, True, True),
        (False, False, False),
    ],
)
def test_cpu_offload_and_its_hyperpod_name_are_one_setting(
    cpu_offload: bool | None, offload_activations: bool | None, resolved: bool
) -> None:
    """Every reader asks ``offloads_to_cpu``: FSDP2 on one rank too when it is on."""
    from adapter.parallel import data_parallel

    recipe = load_recipe(offload(cpu_offload, offload_activations))
    assert recipe.model.offloads_to_cpu is resolved
    assert data_parallel(recipe) == ("fsdp" if resolved else "single")


def test_cpu_offload_and_a_different_hyperpod_name_are_an_error_naming_both() -> None:
    assert problems(offload(False, True)) == [
        "model.cpu_offload: got false, but model.offload_activations (its HyperPod name) is "
        "true; set one of the two, e.g. model.cpu_offload alone"
    ]
