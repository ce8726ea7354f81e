"""``python -m benchmarks.results``: runs ``benchmarks.results.document``."""

import sys

from benchmarks.results.document import main

sys.argv[0] = "python -m benchmarks.results"  # argparse's prog, not __main__.py.
sys.exit(main())
