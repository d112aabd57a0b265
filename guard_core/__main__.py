"""``python -m guard_core``: the ``qwen3guard`` command line."""

import sys

from .cli import main

sys.exit(main())
