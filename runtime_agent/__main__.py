"""`python -m runtime_agent run|predict ...`: the `edge-agent` command on a board where the package was copied
(a flashed device folder carries `runtime_agent/`) rather than pip-installed, so there is no console script."""

import sys

from runtime_agent.cli import main

if __name__ == "__main__":  # importing the module (as the import-boundary test does) runs nothing
    sys.exit(main())
