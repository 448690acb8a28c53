"""The memory plan: will a recipe's training step fit its GPUs, and how long will it take?

``make_plan`` (``adapter.memory_plan.planner``, torch) builds the recipe's model as the
adapter builds it, parallelised as the adapter parallelises it, without allocating it, and
traces one training step of the real micro-batch and sequence length under torch's memory
trackers, as rank 0 of a fake world of the job's size (``trace``, ``estimate``). The result,
a ``MemoryPlan`` (``report``, torch-free), is rank 0's peak by what holds it against the
device memory of the job's instances, a verdict, the changes that would make it fit
(``suggest``) and the step's time at an assumed MFU. ``python main.py ... plan=true`` makes
one (``launcher.memory_plan``); ``measure`` runs the same step for real to check it.
"""
