"""`python -m kdlab` (and `torchrun -m kdlab`) run the CLI."""
import sys

from kdlab.cli import main

# The guard matters when worker processes are spawned (DataLoader workers under the
# "spawn" start method re-import the main module): they must not re-run the CLI.
if __name__ == "__main__":
    sys.exit(main())
