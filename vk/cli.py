"""Shared command-line plumbing: one-line errors with exit code 2, --version, examples in --help.

Every ``vk-*`` command is a thin click layer over a library function; this module keeps their behaviour alike:

- a ``VkError`` (bad input, bad option) prints ``vk-xxx: message`` on stderr and exits 2, never a traceback;
- a closed stdout (``vk-gen | head``) exits quietly;
- Ctrl-C exits 130;
- a full disk (ENOSPC, EFBIG under a file-size limit, EDQUOT) prints one line naming the file and exits 74
  (``vk.jsonl.EXIT_NO_SPACE``); the Writer has already cut a partial output back to its last whole record.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

import click

from vk import __version__
from vk.errors import VkError
from vk.jsonl import EXIT_NO_SPACE, NO_SPACE_ERRNOS, cut_to_last_line, no_space_message

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def examples(*lines: str) -> str:
    """An epilog for --help that click prints verbatim (one example per line)."""
    body = "\n".join("  " + ln if ln else "" for ln in lines)
    return "\b\nExamples:\n" + body


def command(name: str, epilog: str | None = None, **kwargs) -> Callable:
    """``@click.command`` with vk's settings, ``--version`` and error handling."""

    def deco(fn: Callable) -> Callable:
        fn = click.version_option(__version__, "--version", prog_name=name, message="%(prog)s %(version)s")(fn)
        cmd = click.command(name=name, context_settings=CONTEXT_SETTINGS, epilog=epilog, **kwargs)(fn)
        return cmd

    return deco


def fail(message: str, code: int = 2) -> None:
    raise VkError(message, exit_code=code)


def main_wrapper(cmd: click.Command, prog: str) -> Callable[..., None]:
    """Wrap a click command as a console-script entry point with vk's error handling."""

    @functools.wraps(cmd)
    def main(argv: list[str] | None = None) -> None:
        if hasattr(signal, "SIGXFSZ"):
            # past a file-size limit (ulimit -f) a write fails with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            cmd.main(args=argv, prog_name=prog, standalone_mode=False)
        except VkError as e:
            _flush_quietly()
            print(f"{prog}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        except click.ClickException as e:
            _flush_quietly()
            msg = " ".join(e.format_message().split())
            hint = f" (see {prog} --help)" if isinstance(e, click.UsageError) else ""
            print(f"{prog}: {msg}{hint}", file=sys.stderr)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except SystemExit as e:
            # click turns EPIPE on stdout into exit(1) after wrapping stdout; a closed pipe is not an error.
            if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
                _quiet_broken_pipe()
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            _no_space(prog, e)
        else:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                _quiet_broken_pipe()
            except OSError as e:
                if e.errno not in NO_SPACE_ERRNOS:
                    raise
                _no_space(prog, e)

    return main


def _no_space(prog: str, e: OSError) -> None:
    """A write that did not go through vk.jsonl.Writer met a full disk: one line naming the file, exit 74."""
    path = e.filename
    if path is None:  # a write to standard output (redirected to a file)
        path = "<stdout>"
        try:
            fd = sys.stdout.fileno()
            cut_to_last_line(fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)  # what is still buffered goes nowhere: the exit flush cannot fail again
        except (OSError, ValueError):
            pass
    print(f"{prog}: {no_space_message(str(path), e)}", file=sys.stderr)
    sys.exit(EXIT_NO_SPACE)


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - nothing to do if stdout is gone
        pass


def _quiet_broken_pipe() -> None:
    # The reader went away (vk-gen | head): not an error. Point stdout at devnull so the exit flush is silent.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)


def restore_sigpipe() -> None:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
