"""The GPU proof pack: one prepared command that measures what only a GPU can show.

Two phases, because the GPU machine has torch and the adapter's dependencies but not the
launcher's (Hydra, omegaconf, datasets):

- ``prepare`` (here): renders every run the pack needs with ``python main.py ...
  dry_run=true`` into ``bench/gpu_pack_runs/`` (git-ignored), makes their data (random
  tokens, tokenizers, a small pretrained-format model) and writes ``manifest.json``.
- ``run OUT_DIR`` (there): reads the manifest, moves the recipes' paths from where they were
  rendered to where the folder is now, runs each part (``bench/gpu_pack/parts.py``) within
  its time box and writes ``OUT_DIR/gpu_pack.json`` and every process's log under
  ``OUT_DIR/logs/``.

``python -m bench gpu --from OUT_DIR/gpu_pack.json`` folds the result into
``bench/results/gpu.json`` and the table of ``bench/README.md`` (``bench/gpu_bench.py``).

The JSON (format ``gpu_pack/1``) always has every field, whatever ran:

- ``name`` ("gpu"), ``format``, ``created``, ``quick`` (a ``--tiny`` rehearsal),
  ``finished`` (false while it runs, or if it was stopped), ``machine`` (host, versions),
  ``device`` (the CUDA probe: ``cuda``, ``name``, ``capability``, ``memory_gib``, torch and
  transformers versions, or ``reason`` without CUDA), ``settings`` (budgets, the limit, each
  part's title and sizes), ``elapsed_s`` and ``parts``;
- ``parts.<name>``: ``status`` (ok, failed, error, timed_out, skipped, not_available,
  pending), ``reason`` (why it didn't run or broke; null when it ran), ``passed`` (a check's
  verdict, null for a measurement), ``results`` (what it measured; {} if nothing),
  ``device`` (where it ran: the GPU's name, "cpu", or null), ``budget_s``, ``elapsed_s``.
"""
