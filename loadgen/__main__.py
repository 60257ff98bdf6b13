"""`python -m loadgen bench ...` / `python -m loadgen bench compare A.json B.json`."""

import sys

from loadgen.cli import main

sys.exit(main())
