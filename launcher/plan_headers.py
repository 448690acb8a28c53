"""The "memory plan" block of each shipped GPU recipe's header, generated from its plan:

    python -m launcher.plan_headers            # plan every GPU recipe, rewrite its block
    python -m launcher.plan_headers NAME ...   # only these recipes
    python -m launcher.plan_headers --check    # exit 1 naming the recipes whose block is stale

A GPU recipe is a training recipe whose header names its ``# Instance:``; it is planned on
its own ``trainer.num_nodes`` nodes of that instance type, its data replaced by the
synthetic set (data paths don't change the plan; packing, kept, does). The block ends
with the plan's key: a hash of the recipe's settings, its instance type and the plan's own
code (``adapter/memory_plan``). ``--check`` recomputes the key without planning
(no torch, a fraction of a second): a recipe, or the plan's code, changed since its block
was written makes it stale. ``tests/test_plan.py`` runs the check, and re-plans one recipe
to compare its numbers with its block.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import textwrap
import time
from pathlib import Path

import yaml

from adapter.memory_plan.report import (
    PLANNED_OBJECTIVES,
    MemoryPlan,
    Target,
    gib,
    peak_line,
    time_line,
)
from launcher.instances import instance_spec

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes_collection" / "recipes"
PLAN_CODE = REPO / "adapter" / "memory_plan"
BLOCK_START = "# Memory plan"
KEY = re.compile(r"\[plan key ([0-9a-f]{16})\]")
WIDTH = 95


def header_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def instance_of(text: str) -> str | None:
    match = re.search(r"^# Instance: (\S+)", "\n".join(header_lines(text)), re.M)
    return match.group(1) if match else None


def gpu_recipes() -> list[str]:
    """The shipped training recipes sized for a GPU instance type."""
    names = []
    for path in sorted(RECIPES.glob("*.yaml")):
        text = path.read_text()
        data = yaml.safe_load(text)
        instance = instance_of(text)
        spec = instance_spec(instance) if instance else None
        objective = (data.get("model") or {}).get("objective", "sft")
        planned = data.get("kind", "train") == "train" and objective in PLANNED_OBJECTIVES
        if planned and spec is not None and spec.gpus:
            names.append(path.stem)
    return names


def plan_code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(PLAN_CODE.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            digest.update(path.relative_to(PLAN_CODE).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def plan_key(name: str, code_hash: str | None = None) -> str:
    """The key of ``name``'s block (see the module docstring)."""
    text = (RECIPES / f"{name}.yaml").read_text()
    data = {
        "recipe": yaml.safe_load(text),
        "instance": instance_of(text),
        "code": code_hash or plan_code_hash(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def stored_key(name: str) -> str | None:
    header = "\n".join(header_lines((RECIPES / f"{name}.yaml").read_text()))
    match = KEY.search(header)
    return match.group(1) if match else None


def stale_recipes(names: list[str] | None = None) -> list[str]:
    code = plan_code_hash()
    return [n for n in names or gpu_recipes() if stored_key(n) != plan_key(n, code)]


def plan_recipe(name: str) -> MemoryPlan:
    """Plan recipe ``name`` on its header's instance type (imports torch and Hydra)."""
    from adapter.config import load_recipe
    from adapter.memory_plan.planner import make_plan
    from launcher.compose import compose_config

    text = (RECIPES / f"{name}.yaml").read_text()
    data = compose_config([f"recipes={name}"])["recipes"]
    data["model"]["data"] |= {"synthetic": "arithmetic", "train_dir": None, "val_dir": None}
    recipe = load_recipe(data, source=name)
    instance = instance_of(text)
    assert instance is not None
    spec = instance_spec(instance)
    assert spec is not None
    target = Target(
        nodes=recipe.trainer.num_nodes,
        devices=recipe.trainer.devices,
        device="cuda",
        instance_type=instance,
        gpu_model=spec.gpu_model,
        memory_gib=spec.gpu_memory_gib,
        peak_flops=spec.bf16_peak_flops,
    )
    return make_plan(recipe, target, name)


def block(plan: MemoryPlan, key: str) -> list[str]:
    """The header block of ``plan``."""
    rows = ", ".join(f"{row} {value / 2**30:.1f}" for row, value in plan.memory.rows())
    text = (
        f"{peak_line(plan)} on {plan.target.describe()}, {plan.parallelism}: {rows} GiB "
        f"(total {gib(plan.memory.total)})"
    )
    if plan.step_time is not None:
        text += f"; {time_line(plan.step_time, plan.target)}"
    text += f". [plan key {key}]"
    first = f"{BLOCK_START} (python -m launcher.plan_headers: rank 0, one training step):"
    body = textwrap.wrap(text, WIDTH - 4, break_on_hyphens=False)
    return [first, *(f"#   {line}" for line in body)]


def with_block(text: str, new: list[str]) -> str:
    """``text`` with its header's memory plan block (or hand-written ``# Memory:`` lines)
    replaced by ``new``; added at the header's end when it has neither."""
    lines = text.splitlines()
    header = header_lines(text)
    start = next(
        (i for i, line in enumerate(header) if line.startswith((BLOCK_START, "# Memory:"))),
        None,
    )
    if start is None:
        return "\n".join([*header, *new, *lines[len(header) :]]) + "\n"
    end = start + 1
    while end < len(header) and header[end].startswith("#   "):
        end += 1
    return "\n".join([*lines[:start], *new, *lines[end:]]) + "\n"


def regenerate(names: list[str]) -> int:
    code = plan_code_hash()
    worst = 0
    for name in names:
        start = time.monotonic()
        plan = plan_recipe(name)
        path = RECIPES / f"{name}.yaml"
        path.write_text(with_block(path.read_text(), block(plan, plan_key(name, code))))
        print(f"{name}: {peak_line(plan)} (planned in {time.monotonic() - start:.1f} s)")
        if plan.verdict == "does not fit":
            worst = 1
    return worst


def main(argv: list[str]) -> int:
    names = [arg for arg in argv if not arg.startswith("-")]
    unknown = sorted(set(names) - set(gpu_recipes()))
    if unknown:
        print(f"error: not a shipped GPU recipe: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if "--check" in argv:
        stale = stale_recipes(names)
        for name in stale:
            print(f"{name}: memory plan block is stale; run python -m launcher.plan_headers {name}")
        return 1 if stale else 0
    return regenerate(names or gpu_recipes())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
