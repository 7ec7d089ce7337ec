"""`python -m kdlab` (and `torchrun -m kdlab`) run the CLI."""
import sys

from kdlab.cli import main

sys.exit(main())
