"""``python -m benchmarks.faults``: runs ``benchmarks.faults.matrix``."""

import sys

from benchmarks.faults.matrix import main

sys.exit(main())
