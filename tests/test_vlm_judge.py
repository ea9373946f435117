"""The VLM judge against a local fake OpenAI-compatible server: good, malformed, slow and silent judges."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from visalign.registry import ConfigError
from visalign.rewards.base import build_reward
from visalign.rewards.vlm_judge import JudgeError, parse_score, parse_verdict


class FakeJudge(BaseHTTPRequestHandler):
    """Answers from a script: each request pops the next behaviour ('score:7', 'garbage', 'sleep', '500')."""

    script: list[str] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append({"body": body, "auth": self.headers.get("Authorization"), "path": self.path})
        what = FakeJudge.script.pop(0) if FakeJudge.script else "garbage"
        if what == "sleep":
            time.sleep(1.0)
            what = "score:5"
        if what == "500":
            self.send_response(500)
            self.end_headers()
            return
        text = {"garbage": "I think it is pretty good, maybe 8?", "twice": "Final score: 3/10\nFinal score: 4/10",
                "verdict:B": "B is closer to the prompt.\nFinal verdict: B"}.get(what)
        if text is None:
            text = f"Alignment: fine.\nQuality: sharp.\nFinal score: {what.split(':')[1]}/10"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeJudge.script, FakeJudge.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


IMAGES = torch.rand(2, 3, 16, 16)


def test_parsers_are_strict():
    assert parse_score("blah\nFinal score: 7.5/10", 10) == 7.5
    assert parse_score("final score: 3", 10) == 3
    for bad in ("score 7", "Final score: 11/10", "Final score: 4/5", "Final score: 3\nFinal score: 4", ""):
        with pytest.raises(ValueError):
            parse_score(bad, 10)
    assert parse_verdict("x\nFinal verdict: tie") == 0.5 and parse_verdict("Final verdict: A") == 1.0
    with pytest.raises(ValueError):
        parse_verdict("A is better")


def test_good_answers_score_in_unit_range_and_the_request_is_well_formed(judge_url, monkeypatch):
    monkeypatch.setenv("VISALIGN_JUDGE_API_KEY", "sk-test")
    FakeJudge.script = ["score:7", "score:2"]
    judge = build_reward({"name": "vlm_judge", "url": judge_url, "concurrency": 1})
    scores = judge(IMAGES, ["a red circle", "two squares"])
    assert scores.tolist() == pytest.approx([0.7, 0.2])
    req = FakeJudge.seen[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    content = req["body"]["messages"][0]["content"]
    assert "Prompt: a red circle" in content[0]["text"] and "Final score: X/10" in content[0]["text"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert judge(IMAGES, ["a red circle", "two squares"]).tolist() == scores.tolist()
    assert len(FakeJudge.seen) == 2  # the second call was answered from the cache


def test_malformed_and_failed_answers_are_retried(judge_url):
    FakeJudge.script = ["garbage", "500", "twice", "score:9"]
    judge = build_reward({"name": "vlm_judge", "url": judge_url, "retries": 4, "backoff": 0.0})
    assert judge(IMAGES[:1], ["a cat"]).tolist() == pytest.approx([0.9])
    assert len(FakeJudge.seen) == 4


def test_a_judge_that_never_answers_properly_fails_with_one_clear_error(judge_url):
    FakeJudge.script = ["garbage"] * 3
    judge = build_reward({"name": "vlm_judge", "url": judge_url, "retries": 3, "backoff": 0.0})
    with pytest.raises(JudgeError, match=r"malformed answer .* after 3 tries"):
        judge(IMAGES[:1], ["a cat"])


def test_a_slow_judge_times_out_and_a_missing_one_is_named(judge_url):
    FakeJudge.script = ["sleep", "sleep"]
    judge = build_reward({"name": "vlm_judge", "url": judge_url, "retries": 2, "backoff": 0.0, "timeout": 0.2})
    with pytest.raises(JudgeError, match="no answer within 0.2s"):
        judge(IMAGES[:1], ["a cat"])
    gone = build_reward({"name": "vlm_judge", "url": "http://127.0.0.1:9/v1", "retries": 1, "timeout": 0.5})
    with pytest.raises(JudgeError, match="127.0.0.1:9"):
        gone(IMAGES[:1], ["a cat"])


def test_pairwise_verdicts_and_no_secret_in_config(judge_url):
    FakeJudge.script = ["verdict:B"]
    judge = build_reward({"name": "vlm_judge", "url": judge_url})
    assert judge.compare(IMAGES[:1], IMAGES[1:], ["a cat"]).tolist() == [0.0]
    assert len(FakeJudge.seen[0]["body"]["messages"][0]["content"]) == 3  # rubric, image A, image B
    from visalign.registry import REWARDS

    with pytest.raises(ConfigError, match="api_key"):
        REWARDS.check_kwargs("vlm_judge", {"api_key": "sk-oops"}, "reward")
