"""One probe: vk-schedule + vk-send + vk-eval with one knob changed, kept as files in ``DIR/<probe>/``.

Each stage is its public library function (``vk.schedule.schedule``, ``vk.send.send``, ``vk.eval.evaluate``), as
``vk.pipeline`` calls them. A probe is complete when ``probe.json`` (its ``sweep_probe`` record) exists; it is
written last, so a probe cut short by a signal or a crash is run again on the next invocation, and one that is
complete with the same key (input, knob, value, length, seed) is reused as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import orjson

from vk import records
from vk.errors import VkError
from vk.jsonl import dumps, iter_lines
from vk.sweep import verdict
from vk.sweep.saturation import Monitor, schedule_arrivals
from vk.sweep.spec import KNOBS, Plan, per_request_goodput, probe_name, probe_seed


@dataclass
class Context:
    """What every probe of one sweep shares."""

    plan: Plan
    sessions: str  # path of the sessions file
    sessions_sha: str
    api: str | None  # None: the server below gives it once started
    outdir: str
    sweep_id: str
    send_options: dict = field(default_factory=dict)
    quiet: bool = False
    sent: int = 0  # probes sent by this process (the first needs no cooldown or between-command)
    probes: list = field(default_factory=list)  # every sweep_probe record, in order
    on_probe: object = None  # callback(record) after each probe
    server: object = None  # a vk.sweep.servers.LazyServer when vk-sweep starts the server under test

    def live_api(self) -> str:
        """The API to send to (the server under test is started here, when a probe first needs it)."""
        return self.server.ensure() if self.server is not None else self.api


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def schedule_options(plan: Plan, value: float, attempt: int) -> dict:
    """vk.schedule.schedule's keywords for this probe (a repeat differs from the first run by its seed only)."""
    opts: dict = {"seed": probe_seed(plan.seed, plan.knob, value, attempt), KNOBS[plan.knob][0]: value}
    if plan.knob == "gamma":
        opts["cv"] = plan.cv
    if plan.knob == "target_rate":
        opts["replay"] = True
    if plan.duration is not None:
        opts["duration"] = plan.duration
    if plan.max_sessions is not None:
        opts["max_sessions"] = plan.max_sessions
    if plan.warmup:
        opts["warmup"] = plan.warmup
    # sessions are repeated as needed to fill the probe (a closed loop only when its length is a count)
    opts["cycle"] = plan.knob != "concurrency" or plan.max_sessions is not None
    return opts


def probe_key(ctx: Context, value: float, attempt: int) -> dict:
    target = {"api": ctx.api} if ctx.server is None else ctx.server.identity  # never its port: it changes
    return {"sessions_sha256": ctx.sessions_sha, **target, "send": ctx.send_options,
            "schedule": schedule_options(ctx.plan, value, attempt)}


def load_complete(pdir: str, key: dict) -> dict | None:
    path = os.path.join(pdir, "probe.json")
    try:
        with open(path, "rb") as fh:
            rec = orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    records.validate_sweep_probe(rec, path)
    return rec if rec.get("key") == key else None


def run_probe(ctx: Context, value: float, attempt: int, index: int) -> dict:
    """Run (or reuse) one probe; returns its sweep_probe record."""
    plan = ctx.plan
    name = probe_name(plan.knob, value, attempt)
    pdir = os.path.join(ctx.outdir, name)
    key = probe_key(ctx, value, attempt)
    done = load_complete(pdir, key)
    if done is not None:
        if done.get("scoring") != scoring(plan):  # other objectives than when it ran: score the kept runs again
            done = score_probe(ctx, name, index, value, attempt, done.get("saturation"),
                               {"run_id": done.get("run_id"), "ended": done.get("ended")}, done.get("wall_s") or 0.0,
                               key, done.get("seed"))
        done = {**done, "index": index, "sweep_id": ctx.sweep_id, "reused": True}
        _say(ctx, f"{name}: complete, reused")
        return done
    if os.path.isdir(pdir):
        shutil.rmtree(pdir)
    os.makedirs(pdir)
    api = ctx.live_api()
    if ctx.sent:
        between(ctx, api)
    else:
        drain(api, plan.drain_timeout)
    ctx.sent += 1

    from vk.schedule import schedule
    from vk.send import send

    sched_path = os.path.join(pdir, "schedule.jsonl")
    opts = key["schedule"]
    with open(sched_path, "wb") as fh:
        for rec in schedule((obj for _, obj in iter_lines(ctx.sessions)), **opts):
            if rec.get("kind") == "scheduled_session":
                # an annotation vk-send passes to every response: vk-eval --group-by sweep_probe, or SQL
                rec["sweep_probe"] = name
                rec["sweep_value"] = value
            fh.write(dumps(rec))
    mode, starts, nreq = schedule_arrivals(sched_path)

    run_path = os.path.join(pdir, "run.jsonl")
    stop = threading.Event()
    monitor = None
    if plan.saturation and mode == "open":
        monitor = Monitor(run_path, starts, nreq, stop, min_time=plan.saturation_min, duration=opts.get("duration"),
                          gauges=lambda: queue_gauges(api))
    annotation = {"sweep": {"sweep_id": ctx.sweep_id, "probe": name, "knob": plan.knob, "value": value,
                            "attempt": attempt, "seed": opts["seed"]}}
    _say(ctx, f"{name}: sending ({plan.knob} {value:g})")
    t0 = time.monotonic()
    with open(sched_path, "rb") as sfh:
        if monitor is not None:
            monitor.start()
        try:
            end = send((orjson.loads(line) for line in sfh if line.strip()), api=api, output=run_path,
                       quiet=True, argv=["vk-sweep", name], run_fields=annotation, stop=stop,
                       server=ctx.server.info() if ctx.server is not None else None,
                       **{"workers": 1, **ctx.send_options})
        finally:
            if monitor is not None:
                monitor.finish()
    wall = time.monotonic() - t0
    if end.get("ended") == "interrupted":
        raise KeyboardInterrupt  # the probe stays incomplete: the next run of the same command redoes it
    saturation = monitor.evidence if monitor is not None else None

    if saturation is None and attempt:
        saturation = earlier_saturation(ctx.outdir, plan.knob, value, attempt)
    return score_probe(ctx, name, index, value, attempt, saturation, end, wall, key, opts["seed"])


def scoring(plan: Plan) -> dict:
    """What a verdict depends on besides the runs (a reused probe scored otherwise is scored again)."""
    return {"objectives": plan.objectives(), "goodput": per_request_goodput(plan), "confidence": plan.confidence,
            "bootstrap": plan.bootstrap}


def score_probe(ctx: Context, name: str, index: int, value: float, attempt: int, saturation: dict | None,
                end: dict, wall: float, key: dict, seed: int) -> dict:
    """Evaluate the probe's runs (a repeat together with the runs before it at the same value: more requests, a
    narrower interval), keep eval.json, and write probe.json last (the probe is complete)."""
    from vk.eval import evaluate

    plan = ctx.plan
    pdir = os.path.join(ctx.outdir, name)
    runs = pooled_runs(ctx.outdir, plan.knob, value, attempt)
    res = evaluate(runs, slo=plan.objectives(), goodput=per_request_goodput(plan)).to_dict()
    with open(os.path.join(pdir, "eval.json"), "wb") as fh:
        fh.write(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    rec = summarize(ctx, name, index, value, attempt, res, runs, saturation, end, wall, key, seed)
    tmp = os.path.join(pdir, "probe.json.tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, os.path.join(pdir, "probe.json"))
    return rec


def pooled_runs(outdir: str, knob: str, value: float, attempt: int) -> list[str]:
    """The run files of attempts 0..attempt at ``value`` (a repeat is scored with the runs before it)."""
    return [os.path.join(outdir, probe_name(knob, value, a), "run.jsonl") for a in range(attempt + 1)]


def earlier_saturation(outdir: str, knob: str, value: float, attempt: int) -> dict | None:
    for a in range(attempt):
        try:
            with open(os.path.join(outdir, probe_name(knob, value, a), "probe.json"), "rb") as fh:
                sat = orjson.loads(fh.read()).get("saturation")
        except (OSError, orjson.JSONDecodeError):
            continue
        if sat is not None:
            return sat
    return None


def summarize(ctx: Context, name: str, index: int, value: float, attempt: int, res: dict, run_path,
              saturation: dict | None, end: dict, wall: float, key: dict, seed: int) -> dict:
    plan = ctx.plan
    cols = verdict.request_columns(run_path) if plan.objectives() else None
    scored = verdict.score(res, cols, goodput_spec=per_request_goodput(plan), confidence=plan.confidence,
                           bootstrap=plan.bootstrap, seed=seed)
    verdict.by_rule(scored, saturation, res["overall"]["counts"].get("measured"))
    return records.new_sweep_probe(
        ctx.sweep_id, name, index, plan.knob, value, attempt=attempt, seed=seed, dir=name,
        pooled=[os.path.basename(os.path.dirname(p)) for p in run_path] if isinstance(run_path, list) else None,
        run_id=end.get("run_id"), ended=end.get("ended"), wall_s=round(wall, 3),
        server_params=ctx.server.params if ctx.server is not None else None, scoring=scoring(plan),
        **figures(res), saturation=saturation, **scored, key=key)


def figures(res: dict) -> dict:
    """The table's figures from a vk-eval result (seconds; rates per second)."""
    ov = res["overall"]
    lat = ov.get("latency", {})
    thr = ov.get("throughput", {})
    steady = thr.get("steady") or {}
    whole = thr.get("whole") or {}
    src = steady if steady.get("requests") else whole

    def q(metric, stat):
        return (lat.get(metric) or {}).get(stat)

    tpot50 = q("tpot", "p50")
    gp = ov.get("goodput") or {}
    return {
        "requests": ov["counts"]["requests"], "ok": ov["counts"]["ok"],
        "error_rate": ov["counts"].get("error_rate"),
        "achieved_rps": src.get("requests_per_s"), "output_tps": src.get("output_tokens_per_s"),
        "ttft_p50": q("ttft", "p50"), "ttft_p99": q("ttft", "p99"),
        "tpot_p50": tpot50, "tpot_p99": q("tpot", "p99"),
        "user_tps": 1.0 / tpot50 if tpot50 else None,
        "attainment": gp.get("attainment"), "goodput_rps": gp.get("requests_per_s"),
    }


# --------------------------------------------------------------------------------------------------------------
# between probes


def queue_gauges(api: str) -> float | None:
    """Requests running + waiting by the server's /metrics (vLLM's gauges), or None where it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    from vk.send.scrape import metrics_url

    try:
        with urllib.request.urlopen(metrics_url(api), timeout=2.0) as r:
            text = r.read().decode("utf-8", "replace")
        total, found = 0.0, False
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                    total += smp.value
                    found = True
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return total if found else None


def drain(api: str, timeout: float) -> dict:
    """Wait until the server says nothing is running or waiting (where /metrics answers), at most ``timeout``."""
    t0 = time.monotonic()
    while True:
        n = queue_gauges(api)
        if n is None or n == 0:
            return {"drained": n is not None, "waited_s": round(time.monotonic() - t0, 3)}
        if time.monotonic() - t0 > timeout:
            return {"drained": False, "waited_s": round(time.monotonic() - t0, 3), "in_queue": n}
        time.sleep(0.1)


def between(ctx: Context, api: str) -> None:
    plan = ctx.plan
    drain(api, plan.drain_timeout)
    if plan.cooldown:
        time.sleep(plan.cooldown)
    if plan.between_cmd:
        p = subprocess.run(plan.between_cmd, shell=True, capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [""])[-1]
            raise VkError(f"--between-cmd exited {p.returncode}: {last}")


def _say(ctx: Context, msg: str) -> None:
    if not ctx.quiet:
        import sys

        print(f"vk-sweep: {msg}", file=sys.stderr)
