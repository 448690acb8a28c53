"""The recipe schema: one definition, used by the launcher to validate and the adapter to run.

Key names follow SageMaker HyperPod v1 recipes (``run``, ``trainer``, ``exp_manager``,
``model``) where the meaning is the same; our additions (data formats, packing, export)
live beside them. Importing this module must stay cheap: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from adapter.data.config import DataConfig
from adapter.durations import DURATION, parse_time_limit
from adapter.elastic import ElasticPolicy, batch_problems, world_size_problems
from adapter.families import (
    FAMILIES,
    GENERIC_ARCH_KEYS,
    PACKED_COMPILE,
    REMOTE_CODE,
    packing_unsupported,
    unknown_family,
)
from adapter.objectives import OBJECTIVES, unknown_objective
from adapter.objectives.dpo_config import DPOConfig, dpo_problems
from adapter.objectives.grpo_config import GRPOConfig, grpo_problems
from adapter.reporting_config import GenerationEvalKeys, ReportingKeys, evaluation_problems
from adapter.schema import ConfigError, Problem, bounded, load, nested, rule, to_dict

Precision = Literal["32", "bf16", "16"]
ShardingStrategy = Literal["full_shard", "hybrid_shard", "shard_grad_op", "no_shard"]
PeftType = Literal[None, "lora", "qlora_4bit", "prefix_tuning", "p_tuning", "prompt_tuning"]
SchedName = Literal["cosine", "linear", "constant"]
PROMPT_LEARNING = ("prefix_tuning", "p_tuning", "prompt_tuning")
"""PEFT methods that prepend virtual tokens to every sequence."""


@dataclass(kw_only=True)
class RunConfig:
    """The run's identity (``run``): its name and wall-clock limit."""

    name: str = "run"
    """Run name: the results directory is ``<base_results_dir>/<name>``."""
    time_limit: str = "6-00:00:00"
    """Wall-clock limit in Slurm format ``[D-]HH:MM:SS`` (also SageMaker ``max_run``)."""

    @rule("name")
    def _name_is_a_path_part(self) -> list[Problem]:
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            return []
        return [Problem("name", f"got {self.name!r}; use letters, digits, '-', '_' and '.' only")]

    @rule("time_limit")
    def _time_limit_parses(self) -> list[Problem]:
        if parse_time_limit(self.time_limit) is not None:
            return []
        message = f"got {self.time_limit!r}; expected [D-]HH:MM:SS, e.g. 1-12:00:00"
        return [Problem("time_limit", message)]


@dataclass(kw_only=True)
class TrainerConfig(GenerationEvalKeys):
    """Where and how long to train (``trainer``): devices and nodes, precision, steps or
    epochs, and how often to evaluate and log."""

    devices: int = bounded(1, ge=1)
    """Processes (GPUs, or CPU ranks) per node: torchrun's ``--nproc_per_node``."""
    num_nodes: int = bounded(1, ge=1)
    """Number of nodes (instances, pods)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Device kind; ``auto`` uses CUDA when available, else CPU (gloo)."""
    precision: Precision = "bf16"
    """``32`` (fp32), ``bf16`` (bf16 params, fp32 reduce) or ``16`` (fp16 with loss scaling)."""
    max_steps: int = bounded(-1, ge=-1)
    """Optimizer steps to train for; -1 = run ``max_epochs`` epochs."""
    max_epochs: int | None = bounded(None, ge=1)
    """Epochs to train for when ``max_steps`` is -1."""
    val_check_interval: int | str = 0
    """Evaluate every N optimizer steps, or a duration (``1ep``, ``500ba``); 0 = end only."""
    limit_val_batches: int = bounded(0, ge=0)
    """Evaluate on at most this many micro-batches per rank; 0 = the whole validation set."""
    eval_on_start: bool = False
    """Also evaluate before the first step (step 0) of a run that starts from the beginning:
    the eval metrics of the initial model."""
    log_every_n_steps: int = bounded(10, ge=1)
    """Print/record metrics every N optimizer steps."""
    stop_grace_s: int = bounded(120, ge=1, le=65535)
    """Seconds a stopped job has, from the stop signal (SIGTERM; Slurm's SIGUSR1 ahead of the
    time limit) to SIGKILL, to finish its step and save a checkpoint. Each backend is set from
    it: Slurm's ``--signal=B:USR1@<s>``, Kubernetes' ``terminationGracePeriodSeconds``,
    torchrun's shutdown timeout, the local launcher's wait before SIGKILL; SageMaker gives 120."""
    collective_timeout_s: int = bounded(600, ge=1)
    """Process group timeout: a collective (all-reduce, FSDP's all-gathers, a barrier) that
    not every rank reaches within this many seconds ends the run with an error naming it and
    the ranks that didn't arrive. Raise it if one rank works alone longer between collectives
    (rank 0 loading a large pretrained model)."""
    non_finite: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss or gradient norm (besides the steps fp16's loss scaler skips):
    ``stop`` the run with an error naming the step, before its optimizer step (no checkpoint
    holds the poisoned state); ``skip`` the step's update instead, counted in the metrics
    (``skipped_steps``; the step and its data still count, and the learning-rate schedule
    advances), stopping after 10 skipped in a row."""

    @rule("max_steps", "max_epochs")
    def _has_a_length(self) -> list[Problem]:
        if self.max_steps == -1 and self.max_epochs is None:
            return [Problem("max_steps", "set trainer.max_steps or trainer.max_epochs")]
        return []

    @rule("val_check_interval")
    def _interval_is_a_duration(self) -> list[Problem]:
        interval = self.val_check_interval
        if isinstance(interval, str) and not DURATION.match(interval):
            return [
                Problem(
                    "val_check_interval",
                    f"got {interval!r}; use steps (int) or a duration such as '1ep' (epochs) "
                    "or '500ba' (batches)",
                )
            ]
        if isinstance(interval, int) and interval < 0:
            return [Problem("val_check_interval", "must be ≥ 0")]
        return []


@dataclass(kw_only=True)
class CheckpointCallbackParams:
    """When sharded checkpoints are saved and how many are kept
    (``exp_manager.checkpoint_callback_params``)."""

    every_n_train_steps: int = bounded(0, ge=0)
    """Save a sharded checkpoint every N optimizer steps; 0 = only at the end (``save_last``)."""
    save_top_k: int = bounded(3, ge=-1)
    """Keep the newest k complete checkpoints; -1 keeps all."""
    save_last: bool = True
    """Save a checkpoint when training ends."""


@dataclass(kw_only=True)
class ExportFullModel:
    """The Hugging Face export of the trained model (``exp_manager.export_full_model``):
    when, where, in which dtype, and whether PEFT adapters are merged too."""

    every_n_train_steps: int = bounded(0, ge=0)
    """Also export a Hugging Face model every N steps (0 = off)."""
    save_last: bool = True
    """Export the final Hugging Face model (``<exp_dir>/hf_model``; SageMaker: /opt/ml/model)."""
    dtype: Literal[None, "fp32", "bf16", "fp16"] = None
    """Weight dtype of the export; null = the training precision."""
    merge_peft: bool = False
    """For PEFT runs also write the merged full model (adapter weights folded in)."""
    output_dir: str | None = None
    """Where the final export goes; null = ``<exp_dir>/hf_model``."""


@dataclass(kw_only=True)
class ExpManagerConfig(ReportingKeys):
    """Where a run's results go and how it resumes (``exp_manager``): experiment and
    checkpoint directories, auto-resume, async checkpoints, TensorBoard, exports."""

    exp_dir: str | None = None
    """Experiment directory; null = the launch's results dir ``<base_results_dir>/<run.name>``."""
    checkpoint_dir: str | None = None
    """Checkpoint root; null = ``<exp_dir>/checkpoints``."""
    auto_resume: bool = True
    """Resume from the newest complete checkpoint in ``checkpoint_dir`` if there is one."""
    resume_from_checkpoint: str | None = None
    """Resume from this checkpoint directory (overrides ``auto_resume``)."""
    async_checkpointing: bool = True
    """Write checkpoints in the background while training continues."""
    create_tensorboard_logger: bool = False
    """Write TensorBoard events to ``<exp_dir>/tensorboard``."""
    checkpoint_callback_params: CheckpointCallbackParams = nested(CheckpointCallbackParams)
    """When to save sharded checkpoints and how many to keep."""
    export_full_model: ExportFullModel = nested(ExportFullModel)
    """Hugging Face export of the trained model."""


@dataclass(kw_only=True)
class SchedConfig:
    """The learning-rate schedule (``model.optim.sched``): warmup, then cosine, linear or
    constant."""

    name: SchedName = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | None = bounded(None, ge=0)
    """Linear warmup steps; null = ``warmup_ratio`` of the total steps."""
    warmup_ratio: float = bounded(0.0, ge=0.0, le=1.0)
    """Warmup as a fraction of total steps when ``warmup_steps`` is null."""
    min_lr: float = bounded(0.0, ge=0.0)
    """Learning rate at the end of the cosine/linear decay."""


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer (``model.optim``): AdamW's settings and the learning-rate schedule."""

    name: Literal["adamw"] = "adamw"
    """Optimizer (AdamW; fused/foreach implementation chosen for the device)."""
    lr: float = bounded(1e-4, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = bounded(0.0, ge=0.0)
    """Decoupled weight decay."""
    betas: list[float] = bounded([0.9, 0.95])
    """AdamW betas."""
    eps: float = bounded(1e-8, gt=0.0)
    """AdamW epsilon."""
    sched: SchedConfig = nested(SchedConfig)
    """Learning-rate schedule."""

    @rule("betas")
    def _betas_are_two_fractions(self) -> list[Problem]:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            message = f"got {self.betas}; expected two values in [0, 1), e.g. [0.9, 0.95]"
            return [Problem("betas", message)]
        return []


@dataclass(kw_only=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (``model.peft``): the method and its sizes."""

    peft_type: PeftType = None
    """Parameter-efficient method; null = full fine-tuning."""
    rank: int = bounded(8, ge=1)
    """LoRA rank."""
    alpha: float = bounded(16.0, gt=0.0)
    """LoRA alpha (scaling = alpha / rank)."""
    dropout: float = bounded(0.05, ge=0.0, lt=1.0)
    """LoRA dropout."""
    target_modules: list[str] | None = None
    """Modules LoRA adapts; null = all linear layers except the output head."""
    num_virtual_tokens: int = bounded(20, ge=1)
    """Virtual tokens for prefix / p-tuning / prompt tuning."""
    encoder_hidden_size: int | None = bounded(None, ge=1)
    """Hidden size of the p-tuning prompt encoder; null = the model's hidden size."""


@dataclass(kw_only=True)
class ModelConfig:
    """The model and how it is trained (``model``): pretrained weights or a random-init
    architecture, objective, batch sizes, parallelism, optimizer, PEFT and data."""

    model_type: str = "llama"
    """Model family of a random-init model (``adapter.families``: llama, mistral, mixtral,
    qwen2, mpt, gpt2, glm); a pretrained model's family comes from its checkpoint."""
    hf_model_name_or_path: str | None = None
    """Pretrained weights: hub id or local dir. Null = random init from the keys below."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer; null = the model's, or one trained on the training text for random-init models."""
    trust_remote_code: bool = False
    """Allow models whose code lives in their repo (ChatGLM-6B)."""
    objective: str = "sft"
    """Training objective, from ``adapter.objectives``: ``sft`` (supervised fine-tuning and
    continued pretraining), ``dpo`` (preference pairs, ``model.dpo``) or ``grpo`` (RL with
    verifiable rewards on prompts with answers, ``model.grpo``; batch sizes count prompts)."""
    max_context_width: int = bounded(2048, ge=8)
    """Sequence length in tokens (longer samples are truncated)."""
    train_batch_size: int = bounded(1, ge=1)
    """Micro-batch size per device."""
    global_batch_size: int | None = bounded(None, ge=1)
    """Samples per optimizer step; = micro batch × devices × nodes × grad accumulation."""
    val_batch_size: int | None = bounded(None, ge=1)
    """Micro-batch size for eval; null = ``train_batch_size``."""
    sharding_strategy: ShardingStrategy = "full_shard"
    """FSDP2 sharding: full_shard (ZeRO-3), shard_grad_op (ZeRO-2), hybrid_shard, no_shard
    (replicated: runs as DDP). One rank without offloading runs the plain model."""
    shard_degree: int | None = bounded(None, ge=1)
    """GPUs per shard group for hybrid_shard; null = devices per node."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass."""
    cpu_offload: bool | None = None
    """Keep parameters, gradients and optimizer state in CPU memory (FSDP2's
    ``CPUOffloadPolicy``: each layer's weights are copied in for its forward and backward,
    the optimizer steps on the CPU); activations stay on the device. Always runs FSDP2,
    also for no_shard and one rank. null = off (or ``offload_activations``)."""
    offload_activations: bool | None = None
    """HyperPod's name for ``cpu_offload``, kept for its recipes: despite the name it
    offloads parameters, gradients and optimizer state, not activations. Set one of the
    two; ``offloads_to_cpu`` is what they say."""
    compile: bool = False
    """``torch.compile`` each decoder layer."""
    seed: int = 1234
    """Seed for init, data order and dropout."""
    grad_clip: float = bounded(1.0, ge=0.0)
    """Max global gradient norm; 0 = no clipping."""
    num_hidden_layers: int | None = bounded(None, ge=1)
    """Random-init architecture: decoder layers."""
    hidden_size: int | None = bounded(None, ge=1)
    """Random-init architecture: model width."""
    num_attention_heads: int | None = bounded(None, ge=1)
    """Random-init architecture: attention heads."""
    num_key_value_heads: int | None = bounded(None, ge=1)
    """Random-init architecture: key/value heads (grouped-query attention)."""
    intermediate_size: int | None = bounded(None, ge=1)
    """Random-init architecture: MLP width."""
    vocab_size: int | None = bounded(None, ge=2)
    """Random-init architecture: vocabulary size (also the size of a trained tokenizer)."""
    max_position_embeddings: int | None = bounded(None, ge=1)
    """Random-init architecture: positions; ≥ max_context_width."""
    num_local_experts: int | None = bounded(None, ge=1)
    """Random-init MoE (mixtral): experts per layer."""
    num_experts_per_tok: int | None = bounded(None, ge=1)
    """Random-init MoE (mixtral): experts routed per token."""
    config_overrides: dict[str, Any] = bounded({})
    """Any other Hugging Face config keys, passed through as they are."""
    optim: OptimConfig = nested(OptimConfig)
    """Optimizer and learning-rate schedule."""
    peft: PeftConfig = nested(PeftConfig)
    """Parameter-efficient fine-tuning."""
    data: DataConfig = nested(DataConfig)
    """Training and validation data."""
    dpo: DPOConfig = nested(DPOConfig)
    """Direct preference optimisation (``model.objective=dpo``)."""
    grpo: GRPOConfig = nested(GRPOConfig)
    """Group relative policy optimisation (``model.objective=grpo``)."""

    @rule("max_context_width", "max_position_embeddings")
    def _context_fits_positions(self) -> list[Problem]:
        positions = self.max_position_embeddings
        if positions is None or self.max_context_width <= positions:
            return []
        return [
            Problem(
                "max_context_width",
                f"got {self.max_context_width}, more than the model's "
                f"max_position_embeddings={positions}; lower it or raise the positions",
            )
        ]

    @property
    def offloads_to_cpu(self) -> bool:
        """``cpu_offload``, else its HyperPod alias ``offload_activations``; off if neither."""
        given = self.cpu_offload if self.cpu_offload is not None else self.offload_activations
        return bool(given)

    @rule("cpu_offload", "offload_activations")
    def _one_offload_setting(self) -> list[Problem]:
        primary, alias = self.cpu_offload, self.offload_activations
        if primary is None or alias is None or primary == alias:
            return []
        message = (
            f"got {str(primary).lower()}, but model.offload_activations (its HyperPod name) is "
            f"{str(alias).lower()}; set one of the two, e.g. model.cpu_offload alone"
        )
        return [Problem("cpu_offload", message)]

    @rule("objective")
    def _objective_is_registered(self) -> list[Problem]:
        if self.objective in OBJECTIVES:
            return []
        return [Problem("objective", unknown_objective(self.objective))]

    @rule(
        "objective", "dpo", "data", "peft.peft_type", "max_context_width", "hf_model_name_or_path"
    )
    def _dpo_fits(self) -> list[Problem]:
        return dpo_problems(self)

    @rule("objective", "grpo", "data", "peft.peft_type", "max_context_width")
    def _grpo_fits(self) -> list[Problem]:
        return grpo_problems(self)

    @rule("hidden_size", "num_attention_heads")
    def _heads_divide_width(self) -> list[Problem]:
        heads = self.num_attention_heads
        if self.hidden_size and heads and self.hidden_size % heads:
            message = f"{self.hidden_size} is not divisible by num_attention_heads={heads}"
            return [Problem("hidden_size", message)]
        return []

    @rule("peft.peft_type", "data.packing", "hf_model_name_or_path")
    def _peft_fits(self) -> list[Problem]:
        peft_type = self.peft.peft_type
        problems = []
        if peft_type in PROMPT_LEARNING and self.data.packing:
            problems.append(
                Problem(
                    "peft.peft_type",
                    f"{peft_type} prepends virtual tokens to every sequence and can't be "
                    "combined with model.data.packing=true; choose one",
                )
            )
        if peft_type == "qlora_4bit" and self.hf_model_name_or_path is None:
            problems.append(
                Problem(
                    "peft.peft_type",
                    "qlora_4bit quantizes pretrained weights as they load: set "
                    "model.hf_model_name_or_path",
                )
            )
        return problems

    @rule("hf_model_name_or_path", "num_hidden_layers")
    def _weights_or_architecture(self) -> list[Problem]:
        if self.hf_model_name_or_path is None and self.num_hidden_layers is None:
            return [
                Problem(
                    "hf_model_name_or_path",
                    "is required unless the architecture is given "
                    "(num_hidden_layers, hidden_size, ...) for a random-init model",
                )
            ]
        return []

    @rule("model_type", "hf_model_name_or_path")
    def _family_is_buildable(self) -> list[Problem]:
        """A random-init model is built from a registered family (``adapter.families``); a
        pretrained one from its checkpoint's config, whatever ``model_type`` says."""
        if self.hf_model_name_or_path is not None:
            return []
        family = FAMILIES.get(self.model_type)
        if family is None:
            return [Problem("model_type", unknown_family(self.model_type))]
        if family.remote_code:
            message = (
                f"got {self.model_type!r}, which can't be built from random init: {REMOTE_CODE}"
            )
            return [Problem("model_type", message)]
        return []

    @rule("data.packing", "model_type", "compile")
    def _family_can_pack(self) -> list[Problem]:
        """Checked by the recipe's model_type at launch (a checkpoint of another type is
        checked again by its own config when the model is built)."""
        family = FAMILIES.get(self.model_type)
        if not self.data.packing or family is None or family.remote_code:
            return []
        if family.packing is None:
            return [Problem("data.packing", packing_unsupported(family))]
        if self.compile and not family.hf_packed_masks:
            message = PACKED_COMPILE.format(model_type=self.model_type)
            return [Problem("data.packing", message)]
        return []

    @rule("model_type", "hf_model_name_or_path", *GENERIC_ARCH_KEYS)
    def _architecture_keys_apply(self) -> list[Problem]:
        family = FAMILIES.get(self.model_type)
        if self.hf_model_name_or_path is not None or family is None:
            return []
        return [
            Problem(key, f"doesn't apply to model_type={self.model_type}; remove it")
            for key in GENERIC_ARCH_KEYS
            if getattr(self, key) is not None and family.key_map.get(key, key) is None
        ]


@dataclass(kw_only=True)
class Recipe:
    """A whole training recipe: the four sections of a HyperPod v1 recipe. The launcher
    validates it; the adapter runs it from the resolved ``recipe.yaml``."""

    run: RunConfig = nested(RunConfig)
    """Run identity and wall-clock limit."""
    trainer: TrainerConfig = nested(TrainerConfig)
    """Devices, nodes, precision and training length."""
    exp_manager: ExpManagerConfig = nested(ExpManagerConfig)
    """Where results, checkpoints and exports go."""
    model: ModelConfig = nested(ModelConfig)
    """Model, optimizer, fine-tuning method and data."""
    elastic_policy: ElasticPolicy = nested(ElasticPolicy)
    """Elastic training between a minimum and a maximum of nodes (HyperPod EKS)."""

    @property
    def world_size(self) -> int:
        return self.trainer.devices * self.trainer.num_nodes

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: ``model.global_batch_size``, else one micro-batch per
        rank of ``trainer.devices`` × ``trainer.num_nodes``."""
        return self.model.global_batch_size or self.model.train_batch_size * self.world_size

    def at_world_size(self, world_size: int) -> Recipe:
        """This recipe as it runs on ``world_size`` ranks. The same recipe when that is
        ``trainer.devices`` × ``trainer.num_nodes``; else (an elastic job the operator
        restarted on another number of nodes) ``trainer.num_nodes`` = the nodes running now
        and ``model.global_batch_size`` = this recipe's global batch, so that gradient
        accumulation grows or shrinks to keep it. ConfigError when it can't be kept."""
        if world_size == self.world_size:
            return self
        devices, global_batch = self.trainer.devices, self.global_batch
        micro = self.model.train_batch_size
        problems = world_size_problems(world_size, devices, micro, global_batch)
        if problems:
            raise ConfigError(problems, f"the recipe on {world_size} ranks")
        trainer = dataclasses.replace(self.trainer, num_nodes=world_size // devices)
        model = dataclasses.replace(self.model, global_batch_size=global_batch)
        return dataclasses.replace(self, trainer=trainer, model=model)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches accumulated per optimizer step on each rank."""
        global_batch = self.model.global_batch_size
        per_step = self.model.train_batch_size * self.world_size
        return 1 if global_batch is None else max(1, global_batch // per_step)

    @rule(
        "model.train_batch_size", "model.global_batch_size", "trainer.devices", "trainer.num_nodes"
    )
    def _global_batch_fits_ranks(self) -> list[Problem]:
        per_step = self.model.train_batch_size * self.world_size
        global_batch = self.model.global_batch_size
        if global_batch is None or global_batch % per_step == 0:
            return []
        nearest = per_step * max(1, round(global_batch / per_step))
        return [
            Problem(
                "model.global_batch_size",
                f"got {global_batch}; must be a multiple of micro batch × devices × nodes = "
                f"{self.model.train_batch_size} × {self.trainer.devices} × "
                f"{self.trainer.num_nodes} = {per_step} (e.g. {nearest})",
            )
        ]

    @rule("exp_manager.evaluate_after_training", "exp_manager.export_full_model", "model.peft")
    def _evaluation_has_a_model(self) -> list[Problem]:
        return evaluation_problems(self)

    @rule(
        "elastic_policy",
        "model.train_batch_size",
        "model.global_batch_size",
        "trainer.devices",
        "trainer.num_nodes",
    )
    def _elastic_range_keeps_global_batch(self) -> list[Problem]:
        trainer, model = self.trainer, self.model
        return batch_problems(
            self.elastic_policy,
            trainer.num_nodes,
            trainer.devices,
            model.train_batch_size,
            model.global_batch_size,
        )

    @rule("model.shard_degree", "model.sharding_strategy", "trainer.devices", "trainer.num_nodes")
    def _shard_degree_fits(self) -> list[Problem]:
        degree = self.model.shard_degree
        if degree is None:
            return []
        problems = []
        if self.world_size % degree:
            problems.append(
                Problem(
                    "model.shard_degree",
                    f"got {degree}; must divide the world size devices × nodes = {self.world_size}",
                )
            )
        if self.model.sharding_strategy != "hybrid_shard":
            message = "only applies to sharding_strategy=hybrid_shard; remove it"
            problems.append(Problem("model.shard_degree", message))
        return problems


def load_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (e.g. a resolved recipe.yaml) into a ``Recipe``."""
    return load(Recipe, data, source)


def recipe_hash(recipe: Recipe, keys: tuple[str, ...] = ("model",)) -> str:
    """A short stable hash of the parts of a recipe that must match to resume a checkpoint."""
    data = to_dict(recipe)
    picked = {k: data[k] for k in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
