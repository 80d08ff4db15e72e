"""vk-gen trace flavors: sessions from production traces and datasets, with explicit semantics.

Public API (called by ``vk-gen --trace FILE --flavor NAME [--stats]``)::

    from vk.gen import traces
    cfg = {"session_generator": {"type": "trace", "trace_file": "mooncake.jsonl", "flavor": {"type": "mooncake"}}}
    for session in traces.generate(cfg, seed=1, count=100, tokenizer=tok, progress=False):
        ...
    print(traces.stats(cfg))          # the trace's shape, as text
    d = traces.stats_dict(cfg)        # the same figures as a dict

Flavors: claude_code, rag, mooncake_conv, mooncake, azure, burstgpt, conversations, requests (see
``vk.gen.traces.flavors`` and the TRACE FLAVORS section of vk-gen(1)).
"""

from __future__ import annotations

from vk.gen.traces.engine import generate
from vk.gen.traces.flavors import FLAVORS
from vk.gen.traces.stats import stats, stats_dict

__all__ = ["generate", "stats", "stats_dict", "FLAVORS"]
