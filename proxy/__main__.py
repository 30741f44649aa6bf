"""`python -m proxy` and the `skill-engine-proxy` command: `proxy.cli`, after one step that
must come before its imports."""

import signal
import sys


def main() -> int:
    """Hold SIGHUP for `run`, then hand over to `proxy.cli.main`.

    SIGHUP asks a running proxy to reload its config. Until the handler for it is in place
    (after half a second of imports, the config and the listeners), the signal's default
    action would end the process instead. Blocked from the first moment, a SIGHUP sent
    meanwhile waits, and becomes a reload once the handler is there.
    """
    if sys.argv[1:2] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from proxy.cli import main as cli_main  # only now: after the signal is held

    return cli_main()


# Guarded: `--workers` starts its workers with multiprocessing's spawn, which imports this
# module again in each of them.
if __name__ == "__main__":
    raise SystemExit(main())
