"""``python -m benchmarks.serving``: runs ``benchmarks.serving.mixed_batch``."""

import sys

from benchmarks.serving.mixed_batch import main

sys.argv[0] = "python -m benchmarks.serving"  # argparse's prog, not __main__.py.
sys.exit(main())
