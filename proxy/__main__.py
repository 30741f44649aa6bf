"""`python -m proxy` is the `skill-engine-proxy` command."""

from proxy.cli import main

# Guarded: `--workers` starts its workers with multiprocessing's spawn, which imports this
# module again in each of them.
if __name__ == "__main__":
    raise SystemExit(main())
