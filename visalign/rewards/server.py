"""An out-of-process reward server for rewards with conflicting dependencies (e.g. ImageReward).

Wire format: JSON with base64 PNG images — never pickle. ``visalign reward-server --reward NAME``
serves ``POST /score`` {"prompts": [...], "images": [base64 PNG, ...]} -> {"scores": [...], "name", "version"};
the ``remote`` reward (``--reward remote::url=http://127.0.0.1:8765``) calls it.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from ..errors import UserError, first_line
from ..registry import REWARDS

MAX_BODY = 512 * 1024 * 1024


def encode_images(images: torch.Tensor) -> list[str]:
    from ..images import to_pil

    out = []
    for img in images:
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def decode_images(items: Sequence[str]) -> torch.Tensor:
    arrs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"), dtype=np.uint8) for s in items]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def make_server(reward, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
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
            length = int(self.headers.get("Content-Length", 0))
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

    return ThreadingHTTPServer((host, port), Handler)


class RemoteRewardError(UserError, ConnectionError):
    """The reward server is down, or refused a request (its message is passed on)."""


@REWARDS.register("remote")
class RemoteReward:
    """A reward served by `visalign reward-server` (JSON + base64 PNG over HTTP; no pickle)."""

    name, version = "remote", "1"

    def __init__(self, url: str = "http://127.0.0.1:8765", timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        import urllib.request

        body = json.dumps({"images": encode_images(images), "prompts": list(prompts)}).encode()
        req = urllib.request.Request(f"{self.url}/score", data=body, headers={"Content-Type": "application/json"})
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
        self.name, self.version = f"remote:{payload.get('name', '')}", payload.get("version", "")
        return torch.tensor(payload["scores"], dtype=torch.float32)
