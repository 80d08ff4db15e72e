"""``vk-send --ray``: one run across a Ray cluster, on one clock.

A Ray worker is a local worker whose pipes are Ray. On each cluster node a ``SenderRelay`` actor forks one
ordinary vk-send worker process (``vk.send.workers.worker_main``, unchanged: the same engine, the same messages)
and relays its two pipes: sessions in (``push``, blocking while the worker's pipe is full: backpressure), records
out (``pull``, batches from a bounded buffer: when the driver falls behind, the worker waits on its pipe as a
local worker would). On the driver each Ray worker is a pair of local pipes, fed by two pump threads, and a
stand-in for the process (``RayWorker``), so that ``vk.send.workers.run_workers`` runs the cluster exactly as it
runs local workers: the same session split, closed-loop credits, ledger, lost-worker accounting, signals and
``Collector``.

One clock: before the start, the driver measures each node's clock offset by repeated round trips (NTP-style:
the sample with the shortest round trip wins; its half round trip bounds the error) and sends every worker the
run's start instant converted to its node's monotonic clock. Times in records are relative to that instant, so
they are on the run's time axis within the offset's uncertainty; the footer says how far each node's clock
drifted during the run (measured again at the end).

Ray is optional (``pip install 'vk[ray]'``); every node needs the same vk installed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time
from array import array

from vk import __version__
from vk.errors import VkError
from vk.send.collector import linear_percentile, round_lag
from vk.send.engine import Config
from vk.send.inputs import first_due
from vk.send.options import raise_nofile_limit
from vk.send.workers import exit_description, worker_main

_mono = time.monotonic

RAY_MISSING = "--ray: Ray is not installed here (pip install 'vk[ray]')"
START_AHEAD = 1.0  # seconds from fixing the start instant to the start: the start message crosses the cluster
PING_ROUNDS = 24  # round trips per node for its clock offset
BATCH = 512  # messages per Ray call, each way ...
BATCH_BYTES = 4 << 20  # ... and at most about this many bytes (sessions with long prompts, records with --save-text)
RELAY_BUFFER = 4096  # messages a relay holds for the driver before its worker waits on its pipe (bounded memory)
PULL_WAIT = 0.05  # seconds a pull waits for the first message
PLACE_TIMEOUT = 60.0  # seconds to wait for the placement group


def import_ray():
    try:
        import ray
    except ImportError:
        raise VkError(RAY_MISSING) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that does not accept connections is refused at once: Ray itself would retry
    for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise VkError(f"--ray: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise VkError(f"--ray {address}: cannot reach the Ray cluster ({e.strerror or e})") from None


def _short(e: BaseException) -> str:
    """A Ray exception in one line (they span many)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = (lines[0] if lines else "").split(". ")[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------------------------
# on a cluster node


class SenderRelay:
    """A Ray actor: one local vk-send worker process on this node, and its pipes relayed to the driver."""

    def __init__(self):
        self.out: queue.Queue = queue.Queue(RELAY_BUFFER)
        self.to_worker = None
        self.stop_event = None
        self.proc = None
        self.ended = False

    def info(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "vk_version": __version__,
                "cpus": os.cpu_count()}

    def clock(self) -> tuple[float, float]:
        return _mono(), time.time()

    def launch(self, cfg: Config, progress: bool, node: int) -> int:
        """Fork the worker (from a thread that lives as long as it: the parent-death signal follows the thread
        that forked) and wait until it is ready; returns the open-file limit it runs with."""
        soft, _hard = raise_nofile_limit()  # a socket per request in flight, as for a local worker
        ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._own, args=(cfg, progress, node, ready), daemon=True,
                         name="vk-relay").start()
        if ready.get() is None:
            raise RuntimeError("the vk-send worker process failed to start")
        return soft

    def _own(self, cfg: Config, progress: bool, node: int, ready: queue.Queue) -> None:
        ctx = mp.get_context("fork")
        in_r, in_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self.stop_event = ctx.Event()
        p = ctx.Process(target=worker_main, args=(cfg, in_r, out_w, self.stop_event, progress, [in_w, out_r],
                                                  os.getpid()), daemon=True, name=f"vk-send-worker-{cfg.worker}")
        p.start()
        in_r.close()
        out_w.close()
        self.proc, self.to_worker = p, in_w
        try:
            ok = out_r.recv_bytes() == b"#ready"
        except (EOFError, OSError):
            ok = False
        ready.put(p.pid if ok else None)
        tag = b',"node":%d}\n' % node  # the record says which node ran it (vk-eval --group-by node)
        out = self.out
        try:
            while True:
                m = out_r.recv_bytes()
                if m[:1] == b"{" and m.endswith(b"}\n"):
                    m = m[:-2] + tag
                out.put(m)
        except (EOFError, OSError):
            pass
        p.join(5)
        out.put(None)

    def push(self, batch: list) -> bool:
        """Hand messages to the worker; blocks while its pipe is full (backpressure to the driver)."""
        try:
            for m in batch:
                self.to_worker.send_bytes(m)
        except (OSError, ValueError):
            return False
        return True

    def close_input(self) -> None:
        try:
            self.to_worker.close()
        except OSError:
            pass

    def pull(self) -> tuple[list, str | None]:
        """Up to BATCH messages from the worker; and, once it has ended, how it ended (else None)."""
        out: list = []
        if self.ended:
            return out, exit_description(self.proc.exitcode)
        try:
            m = self.out.get(timeout=PULL_WAIT)
        except queue.Empty:
            return out, None
        size = 0
        while True:
            if m is None:
                self.ended = True
                return out, exit_description(self.proc.exitcode)
            out.append(m)
            size += len(m)
            if len(out) >= BATCH or size >= BATCH_BYTES:
                return out, None
            try:
                m = self.out.get_nowait()
            except queue.Empty:
                return out, None

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    def worker_pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


# ------------------------------------------------------------------------------------------------------------
# the clock


def measure_offset(ping, rounds: int = PING_ROUNDS) -> dict:
    """A node's clock offsets to this one from ``rounds`` round trips (``ping()`` -> the node's (monotonic, wall)
    times): the tightest round trip wins (NTP's rule: the least queueing), and half of it bounds the error.
    ``mono``: the node's monotonic clock minus ours (what start instants are converted with); ``wall``: the same for
    the wall clocks (what a person compares with NTP)."""
    best = None
    for _ in range(rounds):
        t0, w0 = _mono(), time.time()
        m, w = ping()
        t1, w1 = _mono(), time.time()
        rtt = t1 - t0
        if best is None or rtt < best[0]:
            best = (rtt, m - (t0 + t1) / 2, w - (w0 + w1) / 2)
    rtt, mono, wall = best
    return {"mono": mono, "wall": wall, "uncertainty": rtt / 2, "rtt": rtt, "samples": rounds}


# ------------------------------------------------------------------------------------------------------------
# on the driver


class RayStop:
    """``stop_event`` for run_workers: setting it tells every relay's worker to stop (from a thread: it may be
    set in a signal handler)."""

    def __init__(self, actors: list):
        self.actors = actors
        self.ev = threading.Event()

    def set(self) -> None:
        if self.ev.is_set():
            return
        self.ev.set()
        threading.Thread(target=self._tell, daemon=True, name="vk-ray-stop").start()

    def is_set(self) -> bool:
        return self.ev.is_set()

    def _tell(self) -> None:
        for a in self.actors:
            try:
                a.stop.remote()
            except Exception:  # noqa: BLE001 - a lost actor: nothing to stop
                pass


class RayWorker:
    """The driver's stand-in for one Ray worker, shaped like a local worker process for run_workers: two pumps
    between a pair of local pipes and the relay actor."""

    def __init__(self, ray, w: int, actor, node: dict, ctx, on_lost=None):
        self.ray = ray
        self.on_lost = on_lost  # called before run_workers hears of the loss
        self.mono0: float | None = None  # the run's start instant (the driver's clock)
        self.w = w
        self.actor = actor
        self.node = node
        self.exitcode = None
        self.how_it_ended: str | None = None  # read by vk.send.workers when the worker is lost
        self.lost = False
        self.down_r, self.down_w = ctx.Pipe(duplex=False)  # run_workers -> relay
        self.up_r, self.up_w = ctx.Pipe(duplex=False)  # relay -> run_workers
        self.up = threading.Thread(target=self._up, daemon=True, name=f"vk-ray-up-{w}")
        self.down = threading.Thread(target=self._down, daemon=True, name=f"vk-ray-down-{w}")

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def where(self) -> str:
        return f"Ray worker on node {self.node['node']} ({self.node['host']})"

    def _lose(self, how: str) -> None:
        if not self.lost:
            self.lost = True
            self.how_it_ended = how
            self.kill()  # an actor that is only unreachable for now must not go on sending unrecorded requests

    def _down(self) -> None:
        conn = self.down_r
        ray = self.ray
        offset = self.node["clock"]["mono"]
        while True:
            try:
                batch = [conn.recv_bytes()]
                size = len(batch[0])
                while len(batch) < BATCH and size < BATCH_BYTES and conn.poll():
                    batch.append(conn.recv_bytes())
                    size += len(batch[-1])
            except (EOFError, OSError):
                break
            if self.lost:
                continue  # keep reading, so that run_workers never blocks on a lost worker's pipe
            if batch[0].startswith(b"start "):  # the run's start instant, on this node's monotonic clock
                _, m0, e0 = batch[0].split()
                self.mono0 = float(m0)
                batch[0] = b"start %r %s" % (float(m0) + offset, e0)
            try:
                ray.get(self.actor.push.remote(batch))
            except Exception as e:  # noqa: BLE001 - the actor or its node is gone
                self._lose(f"{self.where()} lost: {_short(e)}")
        if not self.lost:
            try:
                self.actor.close_input.remote()
            except Exception:  # noqa: BLE001
                pass

    def _up(self) -> None:
        ray = self.ray
        out = self.up_w
        try:
            ref = self.actor.pull.remote()
            while True:
                msgs, how = ray.get(ref)
                if how is None:
                    ref = self.actor.pull.remote()  # the next batch travels while this one is written
                for m in msgs:
                    out.send_bytes(m)
                if how is not None:
                    if how != "exit status 0":
                        self._lose(f"{self.where()}: its process ended ({how})")
                    return
        except (OSError, ValueError):
            return  # run_workers closed its end: the run is over
        except Exception as e:  # noqa: BLE001 - the actor or its node is gone
            self._lose(f"{self.where()} lost: {_short(e)}")
        finally:
            if self.lost and self.on_lost is not None:
                self.on_lost(self)
            out.close()

    # the process interface run_workers uses
    def join(self, timeout: float | None = None) -> None:
        self.up.join(timeout)

    def is_alive(self) -> bool:
        return self.up.is_alive()

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayPool:
    """The cluster's sender workers for one run."""

    def __init__(self, address: str, workers_per_node: int | None = None, quiet: bool = False):
        ray = import_ray()
        self.ray = ray
        self.address = address
        self.quiet = quiet
        self.own = not ray.is_initialized()
        if self.own:
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...: one line
                raise VkError(f"--ray {address}: cannot connect to the Ray cluster ({_short(e)})") from None
        if workers_per_node is not None and workers_per_node < 1:
            raise VkError(f"--workers-per-node: expected at least 1, got {workers_per_node}")
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
        if not nodes:
            raise VkError(f"--ray {address}: the cluster has no live node with a CPU")
        cpus = [int(n["Resources"]["CPU"]) for n in nodes]
        self.workers_per_node = workers_per_node
        self.size = sum(workers_per_node or c for c in cpus)
        # a bundle per worker; with more workers than CPUs on a node, each takes its share of the smallest node
        self.cpu_each = 1.0 if workers_per_node is None else min(1.0, min(cpus) / workers_per_node)
        self.actors: list = []
        self.workers: list[RayWorker] = []
        self.nodes: list[dict] = []
        self.pg = None
        self.ledger = None
        self.lags: dict[int, array] = {}
        self.ahead = START_AHEAD

    # -- before the run ---------------------------------------------------------------------------------------
    def start(self, cfg: Config, workers: int, progress: bool) -> tuple[list, list, RayStop]:
        """Place ``workers`` relays over the nodes, fork their workers, measure the clocks; returns what
        run_workers takes: (processes, [(to_worker, from_worker)], stop_event)."""
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.pg = placement_group([{"CPU": self.cpu_each}] * workers, strategy="SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=PLACE_TIMEOUT)
        except Exception:  # noqa: BLE001 - GetTimeoutError
            raise VkError(f"--ray: cannot place {workers} workers of {self.cpu_each:g} CPU on the cluster within "
                          f"{PLACE_TIMEOUT:g} s (lower --workers-per-node?)") from None
        relay = ray.remote(SenderRelay)
        self.actors = [relay.options(num_cpus=self.cpu_each, max_concurrency=8, max_restarts=0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(
                                         self.pg, placement_group_bundle_index=w)).remote()
                       for w in range(workers)]
        infos = ray.get([a.info.remote() for a in self.actors])
        for i in infos:
            if i["vk_version"] != __version__:
                raise VkError(f"--ray: node {i['host']} ({i['ip']}) runs vk {i['vk_version']}, the driver vk "
                              f"{__version__}: install the same vk on every node")
        index: dict[str, int] = {}
        for w, i in enumerate(infos):
            k = index.setdefault(i["node_id"], len(index))
            if k == len(self.nodes):
                self.nodes.append({"node": k, "node_id": i["node_id"], "host": i["host"], "ip": i["ip"],
                                   "workers": [], "actor": self.actors[w]})
            self.nodes[k]["workers"].append(w)
        launches = []
        for w, i in enumerate(infos):
            k = index[i["node_id"]]
            wcfg = Config(**{**cfg.__dict__, "worker": w,
                             "concurrency": cfg.concurrency // workers + (1 if w < cfg.concurrency % workers else 0)})
            launches.append(self.actors[w].launch.remote(wcfg, progress, k))
        try:
            for w, soft in enumerate(ray.get(launches)):
                self.nodes[index[infos[w]["node_id"]]]["open_files_limit"] = soft
        except Exception as e:  # noqa: BLE001
            raise VkError(f"--ray: a worker failed to start ({_short(e)})") from None
        for n in self.nodes:  # last before the start: the offsets are as fresh as they can be
            n["clock"] = measure_offset(lambda a=n["actor"]: ray.get(a.clock.remote()))
        ctx = mp.get_context("fork")
        for w, i in enumerate(infos):
            self.workers.append(RayWorker(ray, w, self.actors[w], self.nodes[index[i["node_id"]]], ctx,
                                          on_lost=self._on_lost))
        for rw in self.workers:
            rw.start()
        if not self.quiet:
            warn_offsets(self)
        return self.workers, [(rw.down_w, rw.up_r) for rw in self.workers], RayStop(self.actors)

    def _on_lost(self, rw: RayWorker) -> None:
        if self.ledger is not None:
            maybe_started(self.ledger, rw.w, rw.mono0)

    def attach(self, collector) -> None:
        """Every record gets its node (the driver's own records of a lost worker too); dispatch lag per node; the
        ledger, for a lost worker's sessions."""
        self.ledger = collector.ledger
        add = collector.add
        node_of = {rw.w: rw.node["node"] for rw in self.workers}
        lags = self.lags = {n["node"]: array("d") for n in self.nodes}

        def add_with_node(rec: dict, line: bytes | None = None):
            k = rec.get("node")
            if k is None:
                k = rec["node"] = node_of.get(rec.get("worker"))
                line = None
            td, ti = rec.get("t_dispatched"), rec.get("t_intended")
            if td is not None and ti is not None and k in lags and not rec.get("warmup"):
                lags[k].append(td - ti)
            return add(rec, line)

        collector.add = add_with_node

    def header_fields(self) -> dict:
        """The run header's ``ray`` object: where the workers ran and each node's clock."""
        return {"ray": {
            "address": self.address, "workers_per_node": self.workers_per_node,
            "nodes": [{"node": n["node"], "node_id": n["node_id"], "host": n["host"], "ip": n["ip"],
                       "workers": n["workers"], "open_files_limit": n.get("open_files_limit"),
                       "clock_offset": round(n["clock"]["wall"], 7),
                       "clock_uncertainty": round(n["clock"]["uncertainty"], 7),
                       "clock_rtt": round(n["clock"]["rtt"], 7), "clock_samples": n["clock"]["samples"]}
                      for n in self.nodes]}}

    # -- after the run ----------------------------------------------------------------------------------------
    def footer_fields(self, lag_threshold: float) -> dict:
        """The footer's ``ray_nodes``: per node, its dispatch lag and verdict, how far its clock drifted from the
        offset measured at the start (measured again now), and whether it was lost."""
        ray = self.ray
        out = []
        for n in self.nodes:
            mine = [rw for rw in self.workers if rw.node is n]
            lost = [rw.w for rw in mine if rw.lost]
            entry = {"node": n["node"], "workers_lost": lost}
            s = sorted(self.lags.get(n["node"], ()))
            p99 = linear_percentile(s, 0.99) if s else None
            entry.update(dispatch_lag_p50=round_lag(linear_percentile(s, 0.5) if s else None),
                         dispatch_lag_p99=round_lag(p99), dispatch_lag_max=round_lag(s[-1] if s else None),
                         lagged=p99 is not None and p99 > lag_threshold)
            alive = [rw.actor for rw in mine if not rw.lost]
            if alive:
                try:
                    c = measure_offset(lambda a=alive[0]: ray.get(a.clock.remote(), timeout=5.0), rounds=8)
                    entry["clock_drift"] = round(c["mono"] - n["clock"]["mono"], 7)
                    entry["clock_uncertainty_end"] = round(c["uncertainty"], 7)
                except Exception:  # noqa: BLE001 - the node went away at the very end
                    pass
            out.append(entry)
            if entry["lagged"] and not self.quiet and len(self.nodes) > 1:
                print(f"vk-send: node {n['node']} ({n['host']}) lagged: p99 dispatch lag {p99 * 1e3:.2f} ms exceeds "
                      f"{lag_threshold * 1e3:g} ms (its workers: {', '.join(map(str, n['workers']))})",
                      file=sys.stderr)
        return {"ray_nodes": out}

    def close(self) -> None:
        """Stop the relays (their workers exit with them), free the placement group, leave the cluster."""
        ray = self.ray
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
        if self.own:
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass


def maybe_started(ledger, worker: int, mono0: float | None) -> None:
    """A lost Ray worker's sessions that may have started: open loop, those due by now; closed loop, all it was
    handed (it gets a session only for a free slot). Its messages saying which started died with it (a local
    worker's are still in its pipe), so these count as started: their requests without a record become
    'worker lost' records (they may have been sent), never sessions 'not started' or handed to another worker."""
    if mono0 is None:
        return
    now = _mono() - mono0
    for e in ledger.at_worker(worker):
        if e.t_start is not None:
            continue
        start = e.ss.get("start")
        if start is None:
            ledger.mark_started(e.ss.get("index"), e.ss["session"].get("id"), 0.0)
        elif first_due(e.ss) <= now:
            ledger.mark_started(e.ss.get("index"), e.ss["session"].get("id"), float(start))


def warn_offsets(pool: RayPool, out=sys.stderr) -> None:
    """Say on stderr when a node's clock cannot be placed on the run's axis to better than a millisecond."""
    for n in pool.nodes:
        u = n["clock"]["uncertainty"]
        if u > 0.001:
            print(f"vk-send: node {n['node']} ({n['host']}): clock offset known to +-{u * 1e3:.1f} ms only "
                  f"(round trip {n['clock']['rtt'] * 1e3:.1f} ms): its times are on the run's axis within that",
                  file=out)
