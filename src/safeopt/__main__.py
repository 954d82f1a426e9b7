"""``python -m safeopt``: the command-line interface."""

from safeopt.cli import main

raise SystemExit(main())
