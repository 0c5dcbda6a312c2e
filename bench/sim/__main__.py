"""`python -m bench.sim ...`: see bench/sim/run.py."""

import sys

from bench.sim.run import main

sys.exit(main())
