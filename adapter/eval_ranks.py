"""lm-eval's Hugging Face model with its data parallelism on CPU ranks too.

Under ``torchrun --nproc-per-node N`` lm-eval's ``HFLM`` shares every task's requests over
the processes through accelerate, and gathers the results on rank 0 — but only on GPUs.
On CPU two things stop it, and every process evaluates all of the requests as rank 0 of 1
(N times the work, no speed-up):

1. accelerate's ``Accelerator()`` (which HFLM creates) sees no distributed run under
   torchrun on a machine without GPUs unless told to use the CPU (``cpu=True``, what
   ``accelerate launch --cpu`` sets): its state is ``DistributedType.NO``, one process.
2. HFLM takes its rank and world size from the accelerator only where it counts more than
   one GPU (``torch.cuda.device_count() > 1``); on CPU it keeps rank 0 of 1.

``CpuRanksHFLM`` fixes both and nothing else: accelerate's state is made for the CPU
first (gloo, one process per rank), and the rank and world size HFLM leaves at 0 and 1 are
the accelerator's. lm-eval then does what it does on GPUs: each rank builds its share of
the requests, pads the forward passes to the same count and gathers the metrics on rank 0.
"""

from __future__ import annotations

from typing import Any


def data_parallel_lm(model_args: dict[str, Any], batch_size: int, device: str) -> Any:
    """The model lm-eval's ``simple_evaluate`` evaluates on every rank, made as it makes its
    ``hf`` model from ``model_args`` and the batch size and device (lm-eval and accelerate
    are imported here: the training image has neither)."""
    from accelerate import PartialState
    from lm_eval.models.huggingface import HFLM

    class CpuRanksHFLM(HFLM):
        """HFLM whose processes on CPU are data-parallel ranks, as they are on GPUs."""

        def __init__(self, **kwargs: Any) -> None:
            if kwargs.get("device") == "cpu":
                # The state HFLM's Accelerator() then shares: MULTI_CPU with gloo under torchrun.
                PartialState(cpu=True)
            super().__init__(**kwargs)
            accelerator = getattr(self, "accelerator", None)  # set for several processes
            if accelerator is not None and self.world_size == 1:
                self._rank = accelerator.local_process_index
                self._world_size = accelerator.num_processes

    extra = {"batch_size": batch_size, "max_batch_size": None, "device": device}
    return CpuRanksHFLM.create_from_arg_obj(model_args, extra)
