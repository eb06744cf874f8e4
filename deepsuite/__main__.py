"""`python -m deepsuite …` is the `deepsuite` command."""

from deepsuite.cli import main

raise SystemExit(main())
