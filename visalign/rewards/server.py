"""An out-of-process reward server for rewards with conflicting dependencies (e.g. ImageReward).

Wire format: JSON with base64 PNG images — never pickle. ``visalign reward-server --reward NAME``
serves ``POST /score`` {"prompts": [...], "images": [base64 PNG, ...]} -> {"scores": [...], "name", "version"};
the ``remote`` reward (``--reward remote::url=http://127.0.0.1:8765``) calls it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from ..errors import UserError, first_line
from ..registry import REWARDS

MAX_BODY = 512 * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # per image, checked from the PNG header before any pixel is decoded
MAX_CONNECTIONS = 64  # requests served at once; beyond it a connection is answered 503 and closed
READ_TIMEOUT = 30.0  # seconds a client may take to send its request
TOKEN_ENV = "VISALIGN_REWARD_TOKEN"  # when set, requests need `Authorization: Bearer <token>`
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def encode_images(images: torch.Tensor) -> list[str]:
    from ..images import to_pil

    out = []
    for img in images:
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def decode_images(items: Sequence[str]) -> torch.Tensor:
    """base64 PNGs -> [N, 3, H, W] in [0, 1]; an image over MAX_PIXELS is refused from its header, before
    its pixels are decoded (a small PNG can declare a huge canvas)."""
    arrs = []
    for s in items:
        img = Image.open(io.BytesIO(base64.b64decode(s)))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"an image of {img.width}x{img.height} pixels; at most {MAX_PIXELS} pixels per image")
        arrs.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def make_server(reward, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                max_connections: int = MAX_CONNECTIONS) -> ThreadingHTTPServer:
    """The reward behind ``POST /score``, on localhost by default. A read timeout, a cap on connections
    served at once, a decoded-pixel limit, and, with ``token``, a bearer token every request must carry."""
    import hmac
    import threading

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT  # the socket's: a client that stops sending is dropped, not waited on forever

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._send(404, {"error": f"unknown path {self.path}; POST /score"})
            if token is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return self._send(401, {"error": f"missing or wrong bearer token (the server's {TOKEN_ENV})"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._send(400, {"error": "Content-Length must be a whole number of bytes"})
            if length <= 0 or length > MAX_BODY:
                return self._send(400, {"error": "missing or oversized body"})
            try:
                req = json.loads(self.rfile.read(length))
                images, prompts = decode_images(req["images"]), list(req["prompts"])
                if len(images) != len(prompts):
                    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
            except Exception as e:
                return self._send(400, {"error": f"bad request: {e}"})
            try:
                scores = reward(images, prompts)
            except UserError as e:  # the request's fault (e.g. a caption the reward cannot score): say so
                return self._send(422, {"error": str(e)})
            except Exception as e:  # the reward's own failure: answer, and keep serving
                return self._send(500, {"error": f"reward failed: {type(e).__name__}: {first_line(e)}"})
            self._send(200, {"scores": [float(s) for s in scores], "name": getattr(reward, "name", ""),
                             "version": getattr(reward, "version", "")})

        def log_message(self, *args):
            pass

    class CappedServer(ThreadingHTTPServer):
        daemon_threads = True
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n")
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    return CappedServer((host, port), Handler)


class RemoteRewardError(UserError, ConnectionError):
    """The reward server is down, or refused a request (its message is passed on)."""


@REWARDS.register("remote")
class RemoteReward:
    """A reward served by `visalign reward-server` (JSON + base64 PNG over HTTP; no pickle)."""

    name, version = "remote", "1"

    def __init__(self, url: str = "http://127.0.0.1:8765", timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.version = f"1|{self.url}"  # part of the score cache's key: another server's scores are not these

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        import urllib.request

        body = json.dumps({"images": encode_images(images), "prompts": list(prompts)}).encode()
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(TOKEN_ENV)
        if token:
            secret_destination(self.url, TOKEN_ENV)
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"{self.url}/score", data=body, headers=headers)
        import urllib.error

        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # the server answered with an error: pass its message on
            try:
                detail = json.loads(e.read()).get("error", "")
            except (ValueError, OSError, AttributeError):
                detail = e.reason
            raise RemoteRewardError(f"reward server at {self.url} answered {e.code}: {detail}") from None
        except OSError as e:
            raise RemoteRewardError(f"reward server at {self.url} did not answer ({e}); start it with "
                                    "`visalign reward-server --reward NAME --port PORT`") from None
        self.name = f"remote:{payload.get('name', '')}"
        scores = torch.tensor(payload["scores"], dtype=torch.float32)
        if len(scores) != len(prompts) or not bool(torch.isfinite(scores).all()):
            raise RemoteRewardError(f"reward server at {self.url} returned {len(scores)} scores for {len(prompts)} "
                                    "images, or a score that is not a finite number; fix the served reward")
        return scores


def secret_destination(url: str, env: str) -> str:
    """Secrets travel only over https, or to this machine: anything else is refused in one line."""
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.scheme == "https" or (u.scheme == "http" and is_local(u.hostname or "")):
        return url
    raise UserError(f"{env} is set, but {url} is neither https nor this machine: the secret would travel in "
                    "the clear. Use an https:// URL (or unset the variable)")
