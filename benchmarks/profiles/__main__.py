"""``python -m benchmarks.profiles``: runs ``benchmarks.profiles.hlo``."""

import sys

from benchmarks.profiles.hlo import main

sys.argv[0] = "python -m benchmarks.profiles"  # argparse's prog, not __main__.py.
sys.exit(main())
