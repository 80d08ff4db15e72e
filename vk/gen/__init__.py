"""vk-gen: sessions (DAGs of requests with exact-length content and output targets), synthetic or from traces.

Public API::

    from vk.gen import generate, graph_to_dot, render_session_graph
    for session in generate("examples/gen-linear.yaml", seed=1, count=10):
        ...

``vk.gen.content.TextSource`` cuts text of an exact number of tokens; ``vk.gen.distributions`` builds length and
interval distributions from config dicts. Imports are lazy so that ``import vk.gen.content`` stays light.
"""

from __future__ import annotations

__all__ = ["generate", "graph_to_dot", "render_session_graph", "TextSource", "load_config"]


def __getattr__(name):
    if name in ("generate", "load_config"):
        from vk.gen import synth

        return getattr(synth, name)
    if name in ("graph_to_dot", "render_session_graph"):
        from vk.gen import graph

        return getattr(graph, name)
    if name == "TextSource":
        from vk.gen.content import TextSource

        return TextSource
    raise AttributeError(f"module 'vk.gen' has no attribute {name!r}")
