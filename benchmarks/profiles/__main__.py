"""``python -m benchmarks.profiles``: runs ``benchmarks.profiles.hlo``."""

import sys

from benchmarks.profiles.hlo import main

sys.exit(main())
