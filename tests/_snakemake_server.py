"""Runs the `snakemake` command line many times for the cost of one start-up (used by conftest.SnakemakeRunner).

Reading the Snakefile imports torch, timm and the `rpg` package: ~9 s of the ~10 s a `snakemake -n` takes on the
test machines. This process imports them once, then reads one JSON request a line from stdin
(`{"args": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path, "timeout": s}`) and forks a child per
request that runs `snakemake.cli.main(args)` exactly as the `snakemake` executable would, in a fresh copy of this
process (nothing one run changes is seen by the next). It answers each request with `{"returncode": n}`
(negative: killed by that signal; -14 = SIGALRM: the timeout).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import snakemake.cli

# What reading the Snakefile imports (the slow part): workflow/rules/common.smk's modules, and jsonschema, which
# rpg.config.validate_config imports on first use (~2 s).
import jsonschema  # noqa: F401, E402
import rpg.experiments.arch_study.study  # noqa: F401, E402
import rpg.experiments.rules  # noqa: F401, E402
import rpg.experiments.task_zoo.study  # noqa: F401, E402


def _child(request: dict) -> int:
    """Run one snakemake command line in this (forked) process; returns its exit status."""
    signal.alarm(int(request["timeout"]))  # the default action of SIGALRM ends the process, as a timeout would
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, key, flags in ((0, None, os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        target = os.open(request[key] if key else os.devnull, flags)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["snakemake", *request["args"]]
    try:
        snakemake.cli.main(request["args"])
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - report it like the interpreter would, as a failed command
        traceback.print_exc()
        return 1
    return 0


def serve() -> None:
    """Answer requests until stdin closes."""
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child never returns to this loop, whatever happens
            code = 1
            try:
                code = _child(request)
            except BaseException:  # noqa: BLE001 - e.g. a cwd that does not exist: to stderr, never to the replies
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
    os._exit(0)  # skip the interpreter's slow clean-up of torch and friends
