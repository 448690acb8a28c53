"""Evaluation tasks shipped with the adapter: lm-evaluation-harness task YAMLs over JSONL.

``TASKS_DIR`` is passed to lm-eval's ``TaskManager`` as an include path by every eval job
(``adapter.evaluate``), so these tasks run offline by name, like lm-eval's own. The same
directory works with ``python -m lm_eval --include_path <TASKS_DIR>``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent
"""The include path of the shipped tasks."""
