"""``python -m benchmarks.results``: runs ``benchmarks.results.document``."""

import sys

from benchmarks.results.document import main

sys.exit(main())
