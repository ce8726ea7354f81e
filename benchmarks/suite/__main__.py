"""``python -m benchmarks.suite``: runs ``benchmarks.suite.grid``."""

import sys

from benchmarks.suite.grid import main

sys.exit(main())
