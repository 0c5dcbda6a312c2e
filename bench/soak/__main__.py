"""`python -m bench.soak --help`."""

import sys

from bench.soak.run import main

sys.exit(main())
