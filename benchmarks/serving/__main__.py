"""``python -m benchmarks.serving``: runs ``benchmarks.serving.mixed_batch``."""

import sys

from benchmarks.serving.mixed_batch import main

sys.exit(main())
