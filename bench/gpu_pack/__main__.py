"""``python -m bench.gpu_pack prepare|run``: see ``bench/gpu_pack/runner.py``."""

import sys

from bench.gpu_pack.runner import main

sys.exit(main())
