"""``python -m benchmarks.suite``: runs ``benchmarks.suite.grid``."""

import sys

from benchmarks.suite.grid import main

sys.argv[0] = "python -m benchmarks.suite"  # argparse's prog, not __main__.py.
sys.exit(main())
