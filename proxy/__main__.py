"""`python -m proxy` is the `skill-engine-proxy` command."""

from proxy.cli import main

raise SystemExit(main())
