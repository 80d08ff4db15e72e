"""Where vk-eval writes (reports, --db, --cache, plots, the HTML report): a full disk is one line naming the file.

Every write of vk-eval goes through ``writing(path)``: a full disk (ENOSPC), a file-size limit (EFBIG, e.g.
``ulimit -f``) or a quota (EDQUOT), whether Python or DuckDB meets it, becomes a VkError with exit status
EXIT_NO_SPACE (74, EX_IOERR, as vk.jsonl's writer uses for the other commands); other write errors exit 2.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from vk.errors import VkError

EXIT_NO_SPACE = 74
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left", "file too large", "disk quota", "could not write all bytes")


def no_space(path: str, why: str = "") -> VkError:
    return VkError(f"{path}: no space left{why}", exit_code=EXIT_NO_SPACE)


def _why(e: OSError) -> str:
    return {errno.EFBIG: " (file size limit reached)", errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno, "")


@contextlib.contextmanager
def writing(path: str, what: str = "cannot write") -> Iterator[None]:
    """Turn a failed write of ``path`` into one line: ``PATH: no space left`` (exit 74), else ``PATH: cannot
    write (reason)`` (exit 2)."""
    import duckdb

    try:
        yield
    except VkError:
        raise
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise no_space(path, _why(e)) from None
        raise VkError(f"{path}: {what} ({e.strerror or e})") from None
    except duckdb.Error as e:
        text = str(e).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            raise no_space(path) from None
        raise VkError(f"{path}: {what} ({str(e).splitlines()[0]})") from None
