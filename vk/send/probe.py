"""Before the run: the model lookup (``GET {api}/models``) and, when ``--model`` is given, the same request as
a probe, so that what would make every request fail is said once, in one line, before the run starts.

The probe uses the run's own policies: no redirects followed (a redirect is one clear line naming
``Location``), the same TLS settings (``--cacert``, ``--insecure``), the user's headers (``Host`` included) and
the query string of ``--api`` (``?api-version=...``).
"""

from __future__ import annotations

import http.client
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

import orjson

from vk.errors import VkError
from vk.send.options import redact_url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx comes back as an HTTPError


def models_url(api: str) -> str:
    """``{api}/models`` keeping the query string of ``api``."""
    u = urllib.parse.urlsplit(api)
    netloc = u.netloc.rsplit("@", 1)[-1]  # urllib cannot request user:password@host (api_parts refuses it)
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path.rstrip("/") + "/models", u.query, ""))


class _SniHandler(urllib.request.HTTPSHandler):
    """https with the server name of a user ``Host`` header (as the run's requests do)."""

    def __init__(self, context, sni: str):
        super().__init__(context=context)
        self.sni = sni

    def https_open(self, req):
        ctx, sni = self._context, self.sni

        class Conn(http.client.HTTPSConnection):
            def connect(self):
                http.client.HTTPConnection.connect(self)
                self.sock = ctx.wrap_socket(self.sock, server_hostname=sni)

        return self.do_open(Conn, req, context=ctx)


def _get(url: str, api_key, headers, ssl_context, timeout: float):
    handlers = [_NoRedirect()]
    host = next((v for k, v in headers if k.lower() == "host"), None)
    if ssl_context is not None and host:
        from vk.send.tls import sni_host

        handlers.append(_SniHandler(ssl_context, sni_host(host)))
    elif ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    for k, v in headers:
        req.add_header(k, v)
    return opener.open(req, timeout=timeout)


def _redirect_line(url: str, e: urllib.error.HTTPError) -> str:
    loc = e.headers.get("Location") if e.headers else None
    loc = redact_url(loc) if loc else None
    return (f"GET {redact_url(url)} answered HTTP {e.code} redirect to {loc or '(no Location)'}: vk-send does not "
            "follow redirects (each measured request would take an extra hop), so every request would be an error: "
            "point --api at the final URL")


def _tls_failure(e: BaseException) -> ssl.SSLError | None:
    r = getattr(e, "reason", None)
    return r if isinstance(r, ssl.SSLError) else (e if isinstance(e, ssl.SSLError) else None)


def resolve_model(api: str, api_key: str | None, headers: list, ssl_context=None, timeout: float = 10.0) -> str:
    """The first model id from GET {api}/models; one clear error line for what prevents it."""
    from vk.send.tls import describe

    url = models_url(api)
    try:
        with _get(url, api_key, headers, ssl_context, timeout) as r:
            obj = orjson.loads(r.read())
        data = obj.get("data") if isinstance(obj, dict) else None
        if not data:
            raise VkError(f"{redact_url(url)} lists no models; pass --model NAME")
        return str(data[0]["id"])
    except VkError:
        raise
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise VkError(_redirect_line(url, e)) from None
        raise VkError(f"cannot get the model list from {redact_url(url)} (HTTP {e.code}); pass --model NAME"
                      ) from None
    except Exception as e:  # noqa: BLE001 - any failure becomes one line
        tls = _tls_failure(e)
        if tls is not None:
            raise VkError(f"{redact_url(url)}: {describe(tls)}") from None
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, OSError | TimeoutError):
            # no answer at all (refused, unresolvable, timed out): the server is unreachable, not the input bad
            # (man vk-send: EXIT STATUS 4, as when --model is given and no request reaches the server)
            raise VkError(f"cannot get the model list from {redact_url(url)} ({reason}): the server is unreachable",
                          exit_code=4) from None
        raise VkError(f"cannot get the model list from {redact_url(url)} ({reason}); pass --model NAME") from None


def probe(api: str, api_key: str | None, headers: list, ssl_context=None, timeout: float = 5.0,
          quiet: bool = False) -> None:
    """With ``--model`` given: GET {api}/models once; a redirect is a warning line, a TLS certificate failure an
    error (every request would fail the same way). Anything else (no /models route, refused) is left to the
    run's own records."""
    from vk.send.tls import describe

    url = models_url(api)
    try:
        with _get(url, api_key, headers, ssl_context, timeout) as r:
            r.read(1 << 16)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400 and not quiet:
            print(f"vk-send: WARNING: {_redirect_line(url, e)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        tls = _tls_failure(e)
        if isinstance(tls, ssl.SSLCertVerificationError):
            raise VkError(f"{redact_url(url)}: {describe(tls)}") from None
