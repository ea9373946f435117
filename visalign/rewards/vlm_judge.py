"""A VLM judge as a reward: any OpenAI-compatible chat endpoint (vLLM or SGLang serving a Qwen-VL-class model).

In the style of UnifiedReward-Flex: the judge sees the prompt and the image with a rubric of fixed
dimensions, may add dimensions it writes for this prompt, reasons briefly, and ends with one line
``Final score: X/10`` (or ``Final verdict: A|B|Tie`` when comparing two images). Anything else is a
malformed answer: it is asked again, and after ``retries`` tries the call fails with one clear error;
a number is never guessed from free text. The API key comes from the environment variable named by
``api_key_env`` (never from a config); the default endpoint is this machine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ..errors import UserError
from ..registry import REWARDS
from .cache import image_key

SCORE_LINE = re.compile(r"^\s*final score:\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?\s*$", re.IGNORECASE | re.MULTILINE)
VERDICT_LINE = re.compile(r"^\s*final verdict:\s*(A|B|tie)\s*$", re.IGNORECASE | re.MULTILINE)
RUBRIC = ("You are a strict image judge. Rate how well the image satisfies the text prompt.\n"
          "Fixed dimensions: {dimensions}.\n"
          "{extra}Give each dimension one short sentence, then end with exactly one line:\n{final}")


class JudgeError(UserError, ConnectionError):
    """The judge did not answer, or never answered in the required format."""


def parse_score(text: str, scale: float) -> float:
    """The single ``Final score: X[/N]`` line's X in [0, scale]; a missing, repeated or out-of-range score raises."""
    found = SCORE_LINE.findall(text or "")
    if len(found) != 1:
        raise ValueError(f"expected one 'Final score: X/{scale:g}' line, found {len(found)}")
    value, denominator = float(found[0][0]), found[0][1]
    if denominator and float(denominator) != scale:
        raise ValueError(f"score out of {denominator}, expected out of {scale:g}")
    if not 0.0 <= value <= scale:
        raise ValueError(f"score {value} outside [0, {scale:g}]")
    return value


def parse_verdict(text: str) -> float:
    """The single ``Final verdict: A|B|Tie`` line as P(A preferred): 1, 0 or ½."""
    found = VERDICT_LINE.findall(text or "")
    if len(found) != 1:
        raise ValueError(f"expected one 'Final verdict: A|B|Tie' line, found {len(found)}")
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[found[0].lower()]


def _data_url(image: Tensor) -> str:
    from PIL import Image

    u8 = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@REWARDS.register("vlm_judge")
class VLMJudge:
    """A VLM judge behind an OpenAI-compatible chat endpoint: rubric score in [0, 1] (UnifiedReward-Flex style)."""

    name = "vlm_judge"

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
                 dimensions: str = "prompt alignment, visual quality, aesthetics", prompt_dimensions: bool = True,
                 scale: float = 10.0, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 concurrency: int = 8, temperature: float = 0.0, max_tokens: int = 512,
                 api_key_env: str = "VISALIGN_JUDGE_API_KEY"):
        """No setting holds a secret: the API key is read from the environment variable ``api_key_env``."""
        if retries < 1 or concurrency < 1 or timeout <= 0 or scale <= 0:
            raise UserError("reward vlm_judge: retries, concurrency, timeout and scale must be positive")
        self.url, self.model, self.scale = url.rstrip("/"), model, float(scale)
        self.dimensions, self.prompt_dimensions = dimensions, prompt_dimensions
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.temperature, self.max_tokens, self.api_key_env = temperature, max_tokens, api_key_env
        rubric = json.dumps([model, dimensions, prompt_dimensions, scale, temperature])
        self.version = "1-" + hashlib.sha1(rubric.encode()).hexdigest()[:8]  # a new rubric is a new reward
        self._memo: dict[str, float] = {}

    def instructions(self, final: str) -> str:
        extra = ("Then add up to two dimensions that matter for this particular prompt, and rate them too.\n"
                 if self.prompt_dimensions else "")
        return RUBRIC.format(dimensions=self.dimensions, extra=extra, final=final)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        keys = [image_key(im, p) for im, p in zip(images, prompts)]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        final = f"Final score: X/{self.scale:g}"
        with ThreadPoolExecutor(self.concurrency) as pool:
            asked = pool.map(lambda i: self._ask([_data_url(images[i])], prompts[i], final,
                                                 lambda t: parse_score(t, self.scale)), todo)
            for i, value in zip(todo, asked):
                self._memo[keys[i]] = value / self.scale
        return torch.tensor([self._memo[k] for k in keys], dtype=torch.float32)

    def compare(self, images_a: Tensor, images_b: Tensor, prompts: Sequence[str]) -> Tensor:
        """P(A ≻ B) per pair from the judge's verdict (1, 0 or ½ for a tie): labels for existing pairs."""
        final = "Final verdict: A, B or Tie (A is the first image)"
        with ThreadPoolExecutor(self.concurrency) as pool:
            out = pool.map(lambda i: self._ask([_data_url(images_a[i]), _data_url(images_b[i])], prompts[i], final,
                                               parse_verdict), range(len(prompts)))
            return torch.tensor(list(out), dtype=torch.float32)

    def _ask(self, image_urls: list[str], prompt: str, final: str, parse):
        """One judgement: POST, parse strictly; transient failures and malformed answers are retried."""
        content = [{"type": "text", "text": f"{self.instructions(final)}\n\nPrompt: {prompt}"}]
        content += [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        problem = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return parse(self._post(body))
            except ValueError as e:  # the judge answered, but not in the required form: ask again
                problem = f"malformed answer ({e})"
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:  # a client error will not go away by asking again
                    break
            except (OSError, TimeoutError) as e:
                problem = f"no answer within {self.timeout:g}s ({e})"
        raise JudgeError(f"reward vlm_judge at {self.url}: {problem} after {attempt + 1} tries; check that the "
                         f"server runs (docs/judge.md) and serves model {self.model!r}")

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            from .server import secret_destination

            secret_destination(self.url, self.api_key_env)  # never a bearer token in the clear to another host
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            payload = json.loads(resp.read())
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices[0].message.content in the response") from None
