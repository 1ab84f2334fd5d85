"""`python -m sdrt.bench`: the benchmark, and its subprocess workers (`--worker STAGE JOB`)."""

import sys

from sdrt.bench import main

sys.exit(main())
