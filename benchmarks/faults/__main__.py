"""``python -m benchmarks.faults``: runs ``benchmarks.faults.matrix``."""

import sys

from benchmarks.faults.matrix import main

sys.argv[0] = "python -m benchmarks.faults"  # argparse's prog, not __main__.py.
sys.exit(main())
