"""Session graphs as Graphviz: ``graph_to_dot(session)`` (text) and ``render_session_graph(session, path)``.

Solid bold edges are history edges (the child continues that parent's conversation); dashed edges are plain
dependencies (the child waits for the parent). Each node shows its id, input/output tokens and think time.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from vk.errors import VkError


def _q(s) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _body(session: dict, prefix: str = "", indent: str = "  ") -> list[str]:
    lines = []
    for r in session.get("requests", []):
        rid = r["id"]
        label = [str(rid)]
        it, ot = r.get("input_tokens"), r.get("output_tokens")
        if it is not None or ot is not None:
            label.append(f"in {it if it is not None else '?'} / out {ot if ot is not None else '?'}")
        if r.get("prefix_tokens"):
            label.append(f"prefix {r['prefix_tokens']}")
        if r.get("think_time"):
            label.append(f"think {r['think_time']:.3g}s")
        shape = "box" if r.get("parents") else "box, peripheries=2"
        lines.append(f"{indent}{_q(prefix + str(rid))} [label={_q(chr(10).join(label))}, shape={shape}];")
    for r in session.get("requests", []):
        for p in r.get("parents", []):
            style = "bold" if r.get("history") == p else "dashed"
            lines.append(f"{indent}{_q(prefix + str(p))} -> {_q(prefix + str(r['id']))} [style={style}];")
    return lines


def graph_to_dot(session: dict | Iterable[dict]) -> str:
    """Graphviz text for one session (a ``digraph``), or for several (one cluster per session)."""
    if isinstance(session, dict):
        sid = session.get("id", "session")
        head = [f"digraph {_q(sid)} {{", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
                f"  label={_q(f'session {sid}')};", "  labelloc=t;"]
        return "\n".join(head + _body(session) + ["}"]) + "\n"
    out = ["digraph sessions {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    for k, s in enumerate(session):
        sid = s.get("id", k)
        out.append(f"  subgraph {_q(f'cluster_{k}')} {{")
        out.append(f"    label={_q(f'session {sid}')};")
        out += _body(s, prefix=f"{sid}/", indent="    ")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def render_session_graph(session: dict | Iterable[dict], path, format: str = "png") -> Path:
    """Render a session's graph (or several sessions') with Graphviz ``dot`` to ``path``; returns the path.

    Raises VkError when Graphviz is not installed (the dot text from ``graph_to_dot`` can be rendered elsewhere).
    """
    dot = shutil.which("dot")
    if dot is None:
        raise VkError("rendering needs Graphviz's 'dot' command, which is not installed (apt-get install graphviz, "
                      "brew install graphviz); or write the graph as text with --dot and render it elsewhere")
    path = Path(path)
    if not str(path).endswith("." + format) and path.suffix == "":
        path = path.with_suffix("." + format)
    text = graph_to_dot(session if isinstance(session, dict) else list(session))
    try:
        p = subprocess.run([dot, f"-T{format}", "-o", str(path)], input=text.encode(), capture_output=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VkError(f"dot failed: {e}") from None
    if p.returncode != 0:
        msg = p.stderr.decode(errors="replace").strip().splitlines()
        raise VkError(f"dot -T{format} failed: {msg[0] if msg else 'exit ' + str(p.returncode)}")
    return path
