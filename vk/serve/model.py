"""The engine model of vk-serve: a vLLM-style scheduler on a simulated GPU, in real time.

Scheduler (one *step* at a time, like vLLM's v1 scheduler):

1. Running requests first, in order: a request still in prefill gets ``min(remaining prompt, budget)`` tokens
   (chunked prefill), a decoding request gets 1 token; the step's token budget is ``max_num_batched_tokens``.
   KV-cache blocks are allocated for the new tokens; when the cache is full the *last* running request is
   preempted (its blocks freed, it goes back to the front of the queue and is recomputed later).
2. Then waiting requests, first come first served, while there are fewer than ``max_num_seqs`` running, budget
   left and free blocks for their first chunk (admission control: a request that does not fit waits, and so do
   the ones behind it). On admission the prompt's full blocks are looked up in the prefix cache: the leading
   blocks found are reused (``cached_tokens``) and not computed again.
3. The step lasts ``step_time(batch)`` seconds (below); when it ends, every request whose computed tokens caught up
   with its length emits one token (the first one when its prefill finishes), full blocks are hashed into the
   prefix cache, and finished requests free their blocks (they stay cached, evicted least recently used).

Step time, for a step that processes ``N`` tokens (prefill chunk tokens + one per decoding request) and
attends ``K`` KV tokens (the sum over scheduled requests of their context length at the end of the step)::

    T = (t_fixed + max(t_weights, N * t_token) + K * t_kv) / speed

``t_weights`` is the time to stream the weights from HBM once (memory-bound small batches), ``N * t_token`` the
compute time of the linear layers (compute-bound large batches), ``K * t_kv`` the time to read the KV cache in
attention, ``t_fixed`` the per-step overhead (scheduling, sampling, kernel launches). Presets in ``PROFILES``
derive the constants from published figures (parameter counts, layer shapes, datasheet bandwidth and FLOPS)
with stated efficiencies; every constant can be overridden.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, fields, replace

from vk.serve.engine import EARLY, Seq, Stats


@dataclass(frozen=True)
class Profile:
    """A model x GPU preset: step-time constants (seconds) and engine limits."""

    name: str
    description: str
    t_fixed: float
    t_weights: float
    t_token: float
    t_kv: float
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 131072
    source: str = ""

    def describe(self) -> str:
        return (f"{self.description}; t_fixed={self.t_fixed * 1e3:.2f} ms, t_weights={self.t_weights * 1e3:.2f} ms, "
                f"t_token={self.t_token * 1e6:.1f} us, t_kv={self.t_kv * 1e9:.1f} ns, num_blocks={self.num_blocks}"
                f" x {self.block_size}, max_num_seqs={self.max_num_seqs}, "
                f"max_num_batched_tokens={self.max_num_batched_tokens}, max_model_len={self.max_model_len}")


def _derive(params: float, layers: int, kv_heads: int, head_dim: int, gpus: int, bw: float, flops: float,
            hbm_gb: float, bw_eff: float = 0.8, mfu: float = 0.5, mem_util: float = 0.9,
            reserve_gb: float = 4.0, block_size: int = 16) -> dict:
    """Step-time constants from a model's shape and a GPU's datasheet (BF16 weights and KV cache).

    - t_weights = 2 bytes x params / gpus / (bandwidth x bw_eff)
    - t_token   = 2 FLOPs x params / (gpus x peak FLOPS x mfu)
    - t_kv      = (2 (K and V) x layers x kv_heads x head_dim x 2 bytes) / gpus / (bandwidth x bw_eff)
    - num_blocks = (gpus x (hbm x mem_util - reserve) - weights) / (KV bytes per token x block_size)
    """
    weights = 2.0 * params
    kv_per_token = 2 * layers * kv_heads * head_dim * 2
    kv_bytes = gpus * (hbm_gb * 1e9 * mem_util - reserve_gb * 1e9) - weights
    return {
        "t_weights": weights / gpus / (bw * bw_eff),
        "t_token": 2.0 * params / (gpus * flops * mfu),
        "t_kv": kv_per_token / gpus / (bw * bw_eff),
        "num_blocks": int(kv_bytes / (kv_per_token * block_size)),
    }


H100_BW, H100_FLOPS = 3.35e12, 989e12  # H100 SXM5 80 GB: HBM3 3.35 TB/s, 989 TFLOPS dense BF16 (datasheet)
A100_BW, A100_FLOPS = 2.039e12, 312e12  # A100 SXM4 80 GB: HBM2e 2.039 TB/s, 312 TFLOPS dense BF16 (datasheet)

PROFILES: dict[str, Profile] = {
    "llama3.1-8b-h100": Profile(
        "llama3.1-8b-h100", "Llama-3.1-8B-Instruct, BF16, 1x H100 SXM 80GB", t_fixed=0.001,
        **_derive(8.03e9, 32, 8, 128, 1, H100_BW, H100_FLOPS, 80),
        source="Llama 3.1 8B: 8.03B params, 32 layers, 8 KV heads x 128 (model card/config.json); "
               "H100 SXM datasheet; 80% of peak bandwidth, 50% MFU"),
    "llama3.1-70b-4xh100": Profile(
        "llama3.1-70b-4xh100", "Llama-3.1-70B-Instruct, BF16, 4x H100 SXM 80GB, tensor parallel", t_fixed=0.003,
        **_derive(70.6e9, 80, 8, 128, 4, H100_BW, H100_FLOPS, 80),
        source="Llama 3.1 70B: 70.6B params, 80 layers, 8 KV heads x 128; H100 SXM datasheet; TP all-reduce "
               "folded into t_fixed"),
    "qwen2.5-7b-a100": Profile(
        "qwen2.5-7b-a100", "Qwen2.5-7B-Instruct, BF16, 1x A100 SXM 80GB", t_fixed=0.0015,
        **_derive(7.62e9, 28, 4, 128, 1, A100_BW, A100_FLOPS, 80), max_model_len=32768,
        source="Qwen2.5-7B: 7.62B params, 28 layers, 4 KV heads x 128 (config.json); A100 SXM datasheet"),
}


@dataclass
class EngineConfig:
    """The engine's limits and step-time constants (a profile with overrides)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int
    block_size: int
    max_model_len: int
    enable_prefix_caching: bool
    t_fixed: float
    t_weights: float
    t_token: float
    t_kv: float
    speed: float = 1.0
    profile: str = ""

    @classmethod
    def from_profile(cls, profile: str = "llama3.1-8b-h100", **overrides) -> EngineConfig:
        p = PROFILES[profile]
        cfg = cls(max_num_seqs=p.max_num_seqs, max_num_batched_tokens=p.max_num_batched_tokens,
                  num_blocks=p.num_blocks, block_size=p.block_size, max_model_len=p.max_model_len,
                  enable_prefix_caching=True, t_fixed=p.t_fixed, t_weights=p.t_weights, t_token=p.t_token,
                  t_kv=p.t_kv, profile=profile)
        names = {f.name for f in fields(cls)}
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in names and v is not None})
        # A request must fit in the cache on its own.
        cfg.max_model_len = min(cfg.max_model_len, cfg.num_blocks * cfg.block_size)
        return cfg

    @classmethod
    def from_options(cls, opts) -> EngineConfig:
        return cls.from_profile(opts.profile, **{f.name: getattr(opts, f.name, None) for f in fields(cls)
                                                 if f.name != "profile"})

    def step_time(self, n_tokens: int, kv_tokens: int) -> float:
        """Seconds one step takes: ``(t_fixed + max(t_weights, N t_token) + K t_kv) / speed``."""
        return step_time(self, n_tokens, kv_tokens)


def step_time(cfg: EngineConfig, n_tokens: int, kv_tokens: int) -> float:
    """``T = (t_fixed + max(t_weights, n_tokens * t_token) + kv_tokens * t_kv) / speed``."""
    lin = n_tokens * cfg.t_token
    if lin < cfg.t_weights:
        lin = cfg.t_weights
    return (cfg.t_fixed + lin + kv_tokens * cfg.t_kv) / cfg.speed


class Block:
    __slots__ = ("hash", "ref")

    def __init__(self):
        self.hash = None
        self.ref = 1


class KVCache:
    """Paged KV cache: ``num_blocks`` blocks, reference-counted, full blocks hashed for prefix caching.

    Free blocks are either empty or hold cached content (ref 0, still findable by hash); allocation takes empty
    blocks first, then evicts the least recently freed cached block.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.empty = num_blocks
        self.cached: dict = {}  # hash -> Block
        self.evictable: OrderedDict = OrderedDict()  # hash -> Block with ref 0, LRU first

    @property
    def free(self) -> int:
        return self.empty + len(self.evictable)

    def usage(self) -> float:
        return 1.0 - self.free / self.num_blocks

    def allocate(self, n: int, out: list) -> None:
        for _ in range(n):
            if self.empty > 0:
                self.empty -= 1
                out.append(Block())
            else:
                h, b = self.evictable.popitem(last=False)
                del self.cached[h]
                b.hash = None
                b.ref = 1
                out.append(b)

    def lookup(self, hashes: list) -> list:
        """Blocks cached for the leading ``hashes`` (references taken)."""
        hit = []
        cached, evictable = self.cached, self.evictable
        for h in hashes:
            b = cached.get(h)
            if b is None:
                break
            if b.ref == 0:
                del evictable[h]
            b.ref += 1
            hit.append(b)
        return hit

    def release(self, blocks: list) -> None:
        for b in reversed(blocks):  # the tail of a sequence is evicted before its head
            b.ref -= 1
            if b.ref == 0:
                if b.hash is not None:
                    self.evictable[b.hash] = b
                else:
                    self.empty += 1

    def register(self, b: Block, h) -> None:
        if h not in self.cached:
            b.hash = h
            self.cached[h] = b


class Engine:
    """Continuous batching over a :class:`KVCache`, one simulated step at a time, in real time."""

    def __init__(self, loop, cfg: EngineConfig, stats: Stats | None = None, clock=time.monotonic):
        self.loop = loop
        self.cfg = cfg
        self.stats = stats or Stats()
        self.clock = clock
        self.kv = KVCache(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.running_list: list[Seq] = []
        self.waiting_q: deque[Seq] = deque()
        self.stepping = False
        self.batch: list = []
        self.t_end = 0.0
        self.last_step = None  # (t_start, duration, n_tokens, kv_tokens, n_seqs) of the step in flight
        self.on_step = None  # called after each step (the HTTP layer resumes its intake)
        self.step_log = None  # a list to append (t_planned_end, t_actual, n_tokens, kv_tokens, n_seqs) to, or None

    # -- interface --------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(1 for s in self.running_list if not s.done)

    @property
    def waiting(self) -> int:
        return len(self.waiting_q)

    def kv_usage(self) -> float:
        return self.kv.usage()

    def deadline(self) -> float:
        """Until when other work may run without delaying the step in flight."""
        return self.t_end - EARLY - 0.0005 if self.stepping else float("inf")

    def add(self, seq: Seq) -> None:
        if not seq.t_arrival:
            seq.t_arrival = self.clock()
        self.waiting_q.append(seq)
        if not self.stepping:
            self._begin(self.clock())

    def abort(self, seq: Seq) -> None:
        if seq.done:
            return
        seq.aborted = True
        seq.done = True
        if seq.blocks:
            self.kv.release(seq.blocks)
            seq.blocks = []
        try:
            self.waiting_q.remove(seq)
        except ValueError:
            pass
        self.stats.finished(seq, self.clock())

    # -- scheduling -------------------------------------------------------------------------------------------
    def _hashes(self, seq: Seq, upto_blocks: int) -> list:
        """Chain hashes of the sequence's first ``upto_blocks`` full blocks (memoised on the Seq)."""
        hs = seq.hashes
        if hs is None:
            hs = seq.hashes = []
        bs = self.cfg.block_size
        pl = seq.prompt_len
        while len(hs) < upto_blocks:
            i = len(hs)
            a, b = i * bs, (i + 1) * bs
            if b <= pl:
                toks = tuple(seq.prompt_ids[a:b])
            elif a >= pl:
                toks = tuple(seq.out_ids[a - pl:b - pl])
            else:
                toks = tuple(seq.prompt_ids[a:pl]) + tuple(seq.out_ids[: b - pl])
            hs.append(hash((hs[-1] if hs else None, toks)))
        return hs

    def _schedule(self) -> tuple[list, int, int]:
        cfg, kv = self.cfg, self.kv
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        running = [s for s in self.running_list if not s.done]
        batch = []
        n_tokens = kv_tokens = 0
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n_new = seq.prompt_len + seq.n_out - seq.num_computed
            if n_new > budget:
                n_new = budget
            total = seq.num_computed + n_new
            need = -(-total // bs) - len(seq.blocks)
            self_preempted = False
            while need > kv.free:
                victim = running.pop()  # preempt the last running request (recompute later)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    self_preempted = True
                    break
            if self_preempted:
                break
            if need > 0:
                kv.allocate(need, seq.blocks)
            batch.append((seq, n_new))
            budget -= n_new
            n_tokens += n_new
            kv_tokens += total
            i += 1
        now = None
        while not preempted and self.waiting_q and len(running) < cfg.max_num_seqs and budget > 0:
            seq = self.waiting_q[0]
            length = seq.prompt_len + seq.n_out
            hit = []
            if kv.prefix_caching:
                hit = kv.lookup(self._hashes(seq, (length - 1) // bs))
            computed = len(hit) * bs
            n_new = min(length - computed, budget)
            need = -(-(computed + n_new) // bs) - len(hit)
            if need > kv.free:
                if hit:
                    kv.release(hit)
                break
            self.waiting_q.popleft()
            seq.blocks = hit
            kv.allocate(need, seq.blocks)
            seq.num_computed = computed
            if seq.t_scheduled is None:  # first admission (not a resumed preempted request)
                now = now or self.clock()
                seq.t_scheduled = now
                seq.cached_tokens = computed
                self.stats.queue.observe(now - seq.t_arrival)
                self.stats.prompt_tokens += seq.prompt_len
                if kv.prefix_caching:
                    self.stats.prefix_queries += seq.prompt_len
                    self.stats.prefix_hits += computed
            running.append(seq)
            batch.append((seq, n_new))
            budget -= n_new
            n_tokens += n_new
            kv_tokens += computed + n_new
        self.running_list = running
        return batch, n_tokens, kv_tokens

    def _preempt(self, seq: Seq) -> None:
        self.kv.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting_q.appendleft(seq)

    # -- the step loop ----------------------------------------------------------------------------------------
    def _begin(self, t0: float) -> None:
        batch, n_tokens, kv_tokens = self._schedule()
        if not batch:
            self.stepping = False
            self.batch = []
            return
        self.stepping = True
        self.batch = batch
        d = step_time(self.cfg, n_tokens, kv_tokens)
        self.t_end = t0 + d
        self.last_step = (t0, d, n_tokens, kv_tokens, len(batch))
        # uvloop's timers fire up to ~1.3 ms off (millisecond resolution): wake early, then sleep the rest.
        self.loop.call_at(self.t_end - EARLY, self._end)

    def _end(self) -> None:
        now = self.clock()
        t_end = self.t_end
        if now < t_end:  # woken early on purpose: never emit before the model's time
            time.sleep(t_end - now)
            now = self.clock()
        st = self.stats
        st.observe_lag(now - t_end)
        if self.step_log is not None:
            ls = self.last_step
            self.step_log.append((t_end, now, ls[2], ls[3], ls[4]))
        bs = self.cfg.block_size
        kv = self.kv
        caching = kv.prefix_caching
        finished = False
        for seq, n_new in self.batch:
            if seq.done:
                continue
            seq.num_computed += n_new
            if caching:
                full = seq.num_computed // bs
                if full > seq.n_hashed:
                    hs = self._hashes(seq, full)
                    for j in range(seq.n_hashed, full):
                        kv.register(seq.blocks[j], hs[j])
                    seq.n_hashed = full
            if seq.num_computed == seq.prompt_len + seq.n_out:
                if st.token(seq, now):
                    finished = True
                    kv.release(seq.blocks)
                    seq.blocks = []
                    seq.sink.on_token(seq, now)
                    st.finished(seq, now)
                    seq.sink.on_finish(seq, now)
                else:
                    seq.sink.on_token(seq, now)
        if finished:
            self.running_list = [s for s in self.running_list if not s.done]
        # The next step starts when this one ended in the model (the GPU does not wait for the output to be
        # written); if the server fell more than 50 ms behind, it resynchronises with real time.
        self._begin(t_end if now - t_end < 0.05 else self.clock())
        if self.on_step is not None:
            self.on_step()
