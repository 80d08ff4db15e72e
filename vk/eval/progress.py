"""vk-eval's progress bar and stage timings on stderr."""

from __future__ import annotations

import os
from typing import Any

_T0 = [0.0, 0.0]


PROGRESS: dict[str, Any] = {"bar": None}


def progress(enabled: bool) -> None:
    """Show a progress bar over vk-eval's stages on stderr (the CLI: when stderr is a TTY or --progress)."""
    if PROGRESS["bar"] is not None:
        PROGRESS["bar"].close()
        PROGRESS["bar"] = None
    if enabled:
        from tqdm import tqdm

        PROGRESS["bar"] = tqdm(total=7, desc="vk-eval", unit="stage", leave=False, file=__import__("sys").stderr)


def tick(label: str) -> None:
    """Stage timings on stderr when VK_EVAL_TIMING is set (for the bench and for profiling); progress bar."""
    bar = PROGRESS["bar"]
    if bar is not None and label != "start" and not label.startswith(" "):
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)
    if os.environ.get("VK_EVAL_TIMING"):
        import sys
        import time

        now = time.perf_counter()
        cpu = time.process_time()
        if label != "start":
            try:
                import resource

                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                mem = f" {rss:6.0f} MiB RSS (peak {peak:.0f})"
            except (OSError, ImportError, ValueError):
                mem = ""
            print(f"vk-eval timing: {label:<24} {now - _T0[0]:7.3f} s wall {cpu - _T0[1]:7.3f} s cpu{mem}",
                  file=sys.stderr)
        _T0[:] = [now, cpu]
