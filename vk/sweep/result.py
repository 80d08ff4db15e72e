"""SweepResult: the sweep header, its probes and its answer; as a table or JSON."""

from __future__ import annotations

import orjson

from vk.errors import VkError


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def deciding_check(p: dict) -> dict | None:
    """The check that decides the verdict: the first failing one, else the least certain passing one."""
    checks = p.get("checks") or []
    failing = [c for c in checks if not c["ok"]]
    if failing:
        return max(failing, key=lambda c: 1.0 - c["support"])
    return min(checks, key=lambda c: c["support"]) if checks else None


def _tested(c: dict | None) -> str:
    if c is None:
        return "-"
    timed = c["metric"] not in ("error_rate", "attainment", "goodput", "rps", "output_tps", "input_tps",
                                "total_tps", "goodput_tokens", "fluidity", "fluid_share", "cached_share")
    f = _ms if timed else (lambda x: _num(x))
    unit = " ms" if timed else ""
    ci = f" [{f(c['ci'][0])}, {f(c['ci'][1])}]" if c.get("ci") else ""
    return f"{c['slo']}: {f(c['value'])}{ci}{unit}"


class SweepResult:
    """``header`` (the sweep record), ``probes`` (sweep_probe records, in the order run) and ``end``."""

    def __init__(self, header: dict, probes: list[dict], end: dict):
        self.header = header
        self.probes = probes
        self.end = end

    @property
    def answer(self) -> dict | None:
        return self.end.get("answer")

    def to_dict(self) -> dict:
        return {"sweep": self.header, "probes": self.probes, "end": self.end}

    def format(self, fmt: str = "table") -> str:
        if fmt == "json":
            return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() \
                + "\n"
        if fmt != "table":
            raise VkError(f"unknown format {fmt!r} (choose table or json)")
        return self.table()

    def table(self) -> str:
        h = self.header
        cols = ["probe", h["knob"], "rate/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "goodput", "verdict", "tested (95% CI)"]
        rows = []
        for p in self.probes:
            verdict = p.get("verdict") or "-"
            if p.get("verdict"):
                verdict += f" {_pct(p.get('confidence'))}"
                if p.get("uncertain"):
                    verdict += " ?"
                if p.get("saturation"):
                    verdict += " SATURATED"
            rows.append([p["probe"], f"{p['value']:g}", _num(p.get("achieved_rps")), _num(p.get("output_tps")),
                         _ms(p.get("ttft_p50")), _ms(p.get("ttft_p99")), _ms(p.get("tpot_p50")),
                         _ms(p.get("tpot_p99")), _pct(p.get("attainment")), verdict, _tested(deciding_check(p))])
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = [f"vk-sweep {h['sweep_id'][:8]}: {h['mode']} over {h['knob']}"
                 + (f", objectives {h['objectives']}" if h.get("objectives") else "") + " (times in ms)"]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        for p in self.probes:
            s = p.get("saturation")
            if s:
                lines.append(f"{p['probe']}: stopped at {s['t']:g} s ({s['rule']}): {s['arrived']} sessions due and "
                             f"{s['completed']} answered in ({s['window'][0]:g}, {s['window'][1]:g}] s, in flight "
                             f"{s['in_flight'][0]} -> {s['in_flight'][1]}, TTFT {_ms(s['ttft_first_quarter'])} -> "
                             f"{_ms(s['ttft_last_quarter'])} ms (first -> last quarter)"
                             + (f", server queue {s['server_queue'][0]:g} -> {s['server_queue'][1]:g}"
                                if s.get("server_queue") else ""))
        a = self.answer
        e = self.end
        if not h.get("objectives"):
            lines.append("answer: none (no objectives given: --slo, --min-goodput)")
        elif a is not None:
            lo, hi = a.get("last_pass"), a.get("first_fail")
            conf = a.get("confidence")
            lines.append(f"answer: {h['knob']} between {_num(lo)} (last passing) and {_num(hi)} (first failing)"
                         + (f", confidence {_pct(conf)}" if conf is not None else "")
                         + (f"; passing above the first failure at {a['passes_above_first_fail']}"
                            if a.get("passes_above_first_fail") else ""))
        lines.append(f"{e.get('probes', len(self.probes))} probes ({e.get('probes_reused', 0)} reused), "
                     f"{_num(e.get('probe_time_s'), '.1f')} s of probe time; stopped: {e.get('reason')}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.table()
