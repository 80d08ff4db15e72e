"""Prompts of completion requests: parsing, validation, the chat template and counting, on or off the serving loop.

Tokenizing is the heaviest thing vk-serve does (about 200 ms for a 100,000-token prompt, holding the GIL; the
chat template is Python too), so a body larger than :data:`INLINE_BYTES` is handed to a worker *process* forked at
start-up (:class:`PromptWorker`), as vLLM's API server runs apart from its engine core: the serving loop keeps
writing tokens on time while a big prompt is read. The worker answers twice per request: ``parsed`` (the request's
fields, without the prompt, and the prompt's size in UTF-8 bytes, an upper bound of its token count) as soon as the
JSON is read and the template rendered, then ``counted`` (the token count, and the token ids when the engine model
needs them). Its main thread parses; a second thread counts, one prompt after another (``encode_batch`` releases the
GIL), so a request is never parsed late because another is being counted. A prompt that may be longer than the
context window is first counted on a prefix, so a 10 MB prompt is refused after reading a few times the context
window, not the whole text. The worker runs at nice 5, dies with the server (``PR_SET_PDEATHSIG``, and at the end of
its pipe), and gives the memory of a big prompt back (``malloc_trim``).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading

import numpy as np
import orjson

from vk.errors import VkError
from vk.serve.connection import HTTPError

INLINE_BYTES = 4096  # bodies up to this size are handled on the serving loop (about 1 ms of tokenizing)
PREFIX_CHARS_PER_TOKEN = 6  # a prompt longer than the context window is refused after counting this many chars/token
UPPER_BOUND_SLACK = 8  # token count <= UTF-8 bytes + this (a token covers at least one byte; Metaspace adds one)


def prepare(chat: bool, body: bytes, model: str, render) -> tuple[dict, str | list[int]]:
    """Parse and validate a completion request: ``(request, prompt)`` with the prompt as text (the chat template
    applied by ``render(messages, add_generation_prompt)``) or as token ids. Raises :class:`HTTPError`."""
    req = parse_body(body, model)
    return req, (_chat_text(req, render) if chat else _completion_prompt(req))


def parse_body(body: bytes, model: str) -> dict:
    """A request body's JSON object, for the model served (vLLM's errors otherwise). Raises :class:`HTTPError`."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"Invalid JSON body: {e}") from None
    if not isinstance(req, dict):
        raise HTTPError(400, "The request body must be a JSON object")
    want = req.get("model")
    if want is not None and want != model:
        raise HTTPError(404, f"The model `{want}` does not exist.", "NotFoundError", "model")
    return req


def _chat_text(req: dict, render) -> str:
    msgs = req.get("messages")
    if msgs is None:
        raise HTTPError(400, "Field required: 'messages'", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise HTTPError(400, "'messages' must be a non-empty list of messages", param="messages")
    flat = []
    images = []  # image_url parts: (tokens, seed), counted from their size (vk.serve.tasks)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                if isinstance(p, dict) and p.get("type") == "text":
                    parts.append(str(p.get("text", "")))
                elif isinstance(p, str):
                    parts.append(p)
                elif isinstance(p, dict) and p.get("type") == "image_url":
                    from vk.serve.tasks import image_part

                    images.append(image_part(p))
                else:
                    raise HTTPError(400, f"messages[{i}].content: only text and image_url parts are supported",
                                    param="messages")
            m = {**m, "content": "".join(parts)}
        elif c is not None and not isinstance(c, str):
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        flat.append(m)
    if images:
        from vk.serve.tasks import IMAGE_KEY

        req[IMAGE_KEY] = images
    try:
        return render(flat, bool(req.get("add_generation_prompt", True)))
    except HTTPError:
        raise
    except Exception as e:  # noqa: BLE001 - a template error is the client's bad request
        raise HTTPError(400, f"chat template: {e}", param="messages") from None


def _completion_prompt(req: dict) -> str | list[int]:
    p = req.get("prompt")
    if p is None:
        raise HTTPError(400, "Field required: 'prompt'", param="prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise HTTPError(400, "The prompt is empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return list(p)
    if isinstance(p, list) and not p:
        raise HTTPError(400, "The prompt is empty", param="prompt")
    raise HTTPError(400, "'prompt' must be a string or a list of token ids (one prompt)", param="prompt")


def upper_bound(prompt: str | list[int]) -> int:
    """A cheap upper bound of the prompt's token count (exact for token ids)."""
    if isinstance(prompt, list):
        return len(prompt)
    return len(prompt.encode("utf-8", "surrogatepass")) + UPPER_BOUND_SLACK


def too_long(limit: int, count: int | None, chat: bool, max_tokens: int | None = None) -> HTTPError:
    """vLLM's error for a prompt (plus completion) beyond the context window; ``count`` None: more than ``limit``."""
    where = "messages" if chat else "prompt"
    if count is None:
        return HTTPError(400, (
            f"This model's maximum context length is {limit} tokens. However, you requested more than {limit} "
            f"tokens in the {where}. Please reduce the length of the {where} or completion."), param=where)
    want = count + (max_tokens or 0)
    return HTTPError(400, (
        f"This model's maximum context length is {limit} tokens. However, you requested {want} tokens ({count} in "
        f"the messages, {max_tokens or 0} in the completion). Please reduce the length of the messages or "
        "completion."), param=where)


def add_special_tokens(chat: bool, req: dict) -> bool:
    """vLLM's ``add_special_tokens``: False for chat (the template has them), True for completions (a BOS, for
    tokenizers whose post-processor adds one); a request may say otherwise."""
    v = req.get("add_special_tokens")
    return (not chat) if v is None else bool(v)


def encode(tok, text: str, special: bool) -> list[int]:
    return tok.backend.encode(text, add_special_tokens=special).ids


def count_tokens(tok, text: str, limit: int, need_ids: bool, special: bool = False):
    """``(count, ids)`` of ``text``, or ``(None, None)`` when it is surely longer than ``limit`` tokens.

    A text that may be longer than ``limit`` is first encoded on a prefix of ``PREFIX_CHARS_PER_TOKEN * limit``
    characters: when that prefix alone is more than ``limit`` tokens (with a margin for the cut), the rest is not
    read. Otherwise the whole text is encoded (``encode_batch`` releases the GIL).
    """
    if upper_bound(text) > limit and len(text) > PREFIX_CHARS_PER_TOKEN * limit:
        head = tok.backend.encode_batch([text[: PREFIX_CHARS_PER_TOKEN * limit]], add_special_tokens=special)[0]
        if len(head) > limit + 64:
            return None, None
    enc = tok.backend.encode_batch([text], add_special_tokens=special)[0]
    return len(enc), (enc.ids if need_ids else None)


# -- the worker process -------------------------------------------------------------------------------------------

class PromptWorker:
    """A forked process that parses, templates and counts big prompts; results come back through ``on_result``.

    Fork it before the event loop and any thread exist (:meth:`start`), then :meth:`wait_ready` and :meth:`attach`
    it to the loop.
    ``submit(chat, body, limit, callback)`` calls ``callback("parsed", request, upper_bound, exact)`` then
    ``callback("counted", count, ids)`` (``count`` None: longer than ``limit``), or ``callback("error", HTTPError)``,
    on the loop. The worker exits when the server's end of its pipe closes (the server exited, however it died).
    """

    def __init__(self, tokenizer: str | None, model: str, need_ids: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.need_ids = need_ids
        self.fd_in = self.fd_out = None
        self.pid = None
        self.jobs: dict[int, object] = {}
        self._next = 0
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = None

    def start(self) -> None:
        to_r, to_w = os.pipe()  # server -> worker: requests, written by a sender thread (blocking writes)
        from_r, from_w = os.pipe()  # worker -> server: results, read by the event loop (non-blocking)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(to_w)
                os.close(from_r)
                _worker_main(to_r, from_w, self.tokenizer, self.model, self.need_ids)
            except VkError:  # e.g. no such tokenizer: the server loads it too and says so in one line
                code = 2
            except BaseException as e:  # noqa: BLE001 - one line, then leave without running the server's cleanup
                print(f"vk-serve: the prompt worker failed: {type(e).__name__}: {e}", file=sys.stderr)
                code = 1
            finally:
                os._exit(code)
        os.close(to_r)
        os.close(from_w)
        self.fd_out, self.fd_in = to_w, from_r
        self.pid = pid
        self.rbuf = bytearray()
        # Writes of big bodies block until the worker has read them: a thread sends, so the loop never waits.
        self._sender = threading.Thread(target=self._send_loop, name="vk-serve-prompt-sender", daemon=True)
        self._sender.start()

    @property
    def alive(self) -> bool:
        return self.fd_in is not None

    def wait_ready(self) -> None:
        """Block until the worker has loaded its tokenizer and compiled the template (it loads them while the
        server loads its own), so that the first big prompt is not slower than the next."""
        try:
            _read_frame(self.fd_in)
        except (EOFError, OSError):
            os.close(self.fd_in)
            self.fd_in = None
            print("vk-serve: the prompt worker did not start; big prompts are counted on the serving loop",
                  file=sys.stderr)

    def attach(self, loop) -> None:
        self.loop = loop
        if self.fd_in is None:
            return
        os.set_blocking(self.fd_in, False)
        loop.add_reader(self.fd_in, self._readable)

    def stop(self) -> None:
        self.loop = getattr(self, "loop", None)
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)  # it may be in the middle of a long prompt
            except ProcessLookupError:
                pass
        self._outbox.put(None)
        if self.fd_in is not None:
            try:
                self.loop.remove_reader(self.fd_in)
            except Exception:  # noqa: BLE001 - the loop may be closed already
                pass
            os.close(self.fd_in)
            self.fd_in = None
        if self.pid:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None

    def submit(self, chat: bool, body: bytes, limit: int, callback) -> int:
        jid = self._next
        self._next += 1
        self.jobs[jid] = callback
        self._outbox.put((orjson.dumps([jid, chat, limit]), body))
        return jid

    def _send_loop(self) -> None:
        fd = self.fd_out
        try:
            while (item := self._outbox.get()) is not None:
                _write_frame(fd, item[0])
                _write_frame(fd, item[1])
        except OSError:
            pass
        finally:
            os.close(fd)

    def _readable(self) -> None:
        buf = self.rbuf
        eof = False
        while True:
            try:
                data = os.read(self.fd_in, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            buf += data
        while len(buf) >= 8:
            n = int.from_bytes(buf[:8], "little")
            if len(buf) < 8 + n:
                break
            msg = pickle.loads(bytes(buf[8:8 + n]))
            del buf[:8 + n]
            self._deliver(*msg)
        if eof:
            self.loop.remove_reader(self.fd_in)
            os.close(self.fd_in)
            self.fd_in = None
            print("vk-serve: the prompt worker exited; big prompts are now counted on the serving loop",
                  file=sys.stderr)
            for cb in self.jobs.values():
                cb("error", HTTPError(500, "the prompt worker exited", "InternalServerError"))
            self.jobs.clear()

    def _deliver(self, jid: int, kind: str, args) -> None:
        cb = self.jobs.get(jid)
        if kind != "parsed":
            self.jobs.pop(jid, None)
        if cb is None:
            return
        if kind == "counted" and args[1] is not None:
            args = (args[0], np.frombuffer(args[1], dtype=np.int64).tolist())
        elif kind == "error":
            args = (HTTPError(*args),)
        cb(kind, *args)


def _write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(8, "little") + data) if len(data) < 65536 else None
    if view is None:
        _write_all(fd, memoryview(len(data).to_bytes(8, "little")))
        view = memoryview(data)
    _write_all(fd, view)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _read_frame(fd: int) -> bytes:
    return _read_exact(fd, int.from_bytes(_read_exact(fd, 8), "little"))


def _worker_main(fd_in: int, fd_out: int, tokenizer: str | None, model: str, need_ids: bool) -> None:
    parent = os.getppid()
    try:  # Linux: die with the server, even in the middle of a long prompt (else: at the end of its pipe)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; the worker follows when its pipe closes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        os.nice(5)  # on a busy machine the serving loop gets the CPU first: tokens on time, prompts counted after
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the server's first stdout line is its URL, and its reader waits for EOF
    from vk.serve.chat import chat_renderer
    from vk.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    render = chat_renderer(tok)
    tok.backend.encode_batch([render([{"role": "user", "content": "hi"}], True)])  # compile the template now
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # a reader thread, so the server's writes never wait for a prompt being counted
        try:
            while True:
                head = _read_frame(fd_in)
                inbox.put((head, _read_frame(fd_in)))
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, daemon=True).start()

    send_lock = threading.Lock()  # the parser and the counter both answer

    def send(*msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with send_lock:
            _write_frame(fd_out, data)

    send(-1, "ready", ())

    trim = _malloc_trim()
    counting: queue.SimpleQueue = queue.SimpleQueue()  # (jid, chat, limit, req, text, big), or None to stop

    def count_loop() -> None:
        """Counts prompts one after another in its own thread (encode_batch releases the GIL), so that requests
        arriving meanwhile are parsed and answered ``parsed`` at once: a fixed-latency request may start on it."""
        while (job := counting.get()) is not None:
            jid, chat, limit, req, prompt, big = job
            job = None
            try:
                n, ids = count_tokens(tok, prompt, limit, need_ids, add_special_tokens(chat, req))
                prompt = None
                send(jid, "counted", (n, np.asarray(ids, dtype=np.int64).tobytes() if ids is not None else None))
            except (OSError, EOFError):
                return
            except Exception as e:  # noqa: BLE001 - one bad request must not end the worker
                send(jid, "error", (500, f"internal error: {e!r}", "InternalServerError", None))
            if big:  # give the memory of a big prompt back to the system (glibc keeps freed arenas otherwise)
                prompt = None
                trim()

    threading.Thread(target=count_loop, daemon=True).start()
    while (item := inbox.get()) is not None:
        head, body = item
        jid, chat, limit = orjson.loads(head)
        big = len(body) > 1 << 20
        try:
            req, prompt = prepare(chat, body, model, render)
            body = None
            for k in ("messages", "prompt"):
                req.pop(k, None)
            exact = isinstance(prompt, list)
            send(jid, "parsed", (req, upper_bound(prompt), exact))
            if exact:
                send(jid, "counted", (len(prompt), np.asarray(prompt, dtype=np.int64).tobytes() if need_ids else None))
            else:
                counting.put((jid, chat, limit, req, prompt, big))
            prompt = None
        except HTTPError as e:
            send(jid, "error", (e.code, e.message, e.type, e.param))
        except (OSError, EOFError):
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not end the worker
            send(jid, "error", (500, f"internal error: {e!r}", "InternalServerError", None))
    counting.put(None)


def _malloc_trim():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None
