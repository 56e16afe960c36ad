"""MMHal-Bench: template, rating parser, metrics, rule mode, and the judge against a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlmkit.errors import DataError, JudgeError
from vlmkit.evals import mmhal, tasks, words
from vlmkit.evals.judge import Judge

SECRET = "sk-test-secret-123"


def test_template_has_96_records_in_cyclic_type_order():
    records = mmhal.read_template()
    assert len(records) == 96
    assert [r["question_type"] for r in records[:8]] == list(mmhal.TYPES)
    assert all(r["question_type"] == mmhal.TYPES[i % 8] for i, r in enumerate(records))
    assert all(r["model_answer"] == "" for r in records)


def test_bad_template(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"question_type": "counting", "question": "q", "gt_answer": "a"}]))
    with pytest.raises(DataError, match=r"t.json: record 1: missing key 'image_content'"):
        mmhal.read_template(path)


@pytest.mark.parametrize("reply, rating", [
    ("The answer is fine.\nRating: 5", 5),
    ("**Rating**: 4", 4),
    ("rating: **2**", 2),
    ("Explanation... RATING:6", 6),
    ("No rating given.", None),
    ("Rating: 3 or maybe Rating: 4", None),
    ("Rating: 3. Final rating: 3", 3),
])
def test_parse_rating(reply, rating):
    assert mmhal.parse_rating(reply) == rating


def test_metrics_per_type_and_hallucination_rate():
    records = [{"question_type": t} for t in ("attribute", "counting", "attribute", "counting")]
    m = mmhal.metrics(records, [6, 2, None, 4])
    assert m["score"] == pytest.approx(3.0)
    assert m["hallucination_rate"] == pytest.approx(0.5)  # 2 and the unparsed 0
    assert m["per_type"] == {"attribute": 3.0, "counting": 3.0}
    assert m["parse_failures"] == 1


def test_prompt_holds_the_record_and_the_scale():
    record = {**mmhal.read_template()[0], "model_answer": "A red bus."}
    prompt = mmhal.judge_prompt(record)
    assert "### LMM Response to Evaluate\nA red bus." in prompt
    assert ", ".join(record["image_content"]) in prompt and "0 - not informative, with hallucination" in prompt


def test_rule_mode():
    offline = words.OfflinePipeline()

    def rate(answer, facts):
        return mmhal.rule_rating({"question": "q", "question_type": "x", "model_answer": answer, "facts": facts},
                                 offline)

    assert rate("There is no dog in the image.", {"object": "dog", "present": False}) == 6
    assert rate("The dog is brown.", {"object": "dog", "present": False}) == 0
    assert rate("There are three cups.", {"object": "cup", "count": 3}) == 6
    assert rate("I see 2 cups.", {"object": "cup", "count": 3}) == 0
    assert rate("The bus is larger than the car.", {"objects": ["car", "bus"], "larger": "bus"}) == 6
    assert rate("The car is larger.", {"objects": ["car", "bus"], "larger": "bus"}) == 0
    assert rate("It is red.", {"color": ["red", "crimson"]}) == 6
    assert rate("This is a living room.", {"scene": "living_room"}) == 6
    assert rate("A dog and a cat on a couch.", {"objects": ["dog", "couch"]}) == 0
    assert rate("A dog on a couch.", {"objects": ["dog", "couch"]}) == 6
    assert rate("Something blurry.", {"objects": ["dog"]}) == 3
    with pytest.raises(DataError, match="facts"):
        rate("x", {"unknown": 1})


# ---- the fake judge server ------------------------------------------------------------------------------------

class FakeJudge:
    """A chat-completions server on 127.0.0.1 that replays a script of behaviours, one per request."""

    def __init__(self):
        self.script: list[str] = []
        self.default = "ok"
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"body": body, "auth": self.headers.get("Authorization"), "path": self.path})
                action = fake.script.pop(0) if fake.script else fake.default
                if action == "sleep":
                    time.sleep(1.0)
                    action = "ok"
                if action in ("429", "500"):
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if action == "garbage":
                    payload = b"<html>oops</html>"
                else:
                    content = "Clear answer.\nRating: 5" if action == "ok" else "I refuse to rate."
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    fake = FakeJudge()
    yield fake
    fake.close()


def make_judge(server, tmp_path, **kwargs):
    options = {"cache_dir": tmp_path / "cache", "timeout": 0.3, "retries": 2, "backoff": 0.01,
               "api_key_env": "VLMKIT_TEST_JUDGE_KEY"} | kwargs
    return Judge(server.url, "fake-judge", **options)


def filled(n: int) -> list[dict]:
    return [{**r, "model_answer": f"answer {i}"} for i, r in enumerate(mmhal.read_template()[:n])]


def test_judge_success_sends_key_only_in_header_and_caches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_TEST_JUDGE_KEY", SECRET)
    judge = make_judge(server, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    metrics = tasks.score_mmhal(filled(3), out, judge=judge, progress=False)
    assert metrics["score"] == 5 and metrics["n"] == 3 and metrics["parse_failures"] == 0
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"
    assert server.requests[0]["body"]["temperature"] == 0
    tasks.score_mmhal(filled(3), out, judge=judge, progress=False)
    assert len(server.requests) == 3  # the second run came from the cache
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(SECRET in p.read_text() for p in written)
    assert SECRET not in json.dumps(metrics)


def test_malformed_rating_scores_zero_and_is_counted(server, tmp_path):
    server.script = ["ok", "norating"]
    metrics = tasks.score_mmhal(filled(2), None, judge=make_judge(server, tmp_path), progress=False)
    assert metrics["parse_failures"] == 1 and metrics["score"] == pytest.approx(2.5)


@pytest.mark.parametrize("failure", ["429", "500", "garbage", "sleep"])
def test_judge_retries_then_succeeds(server, tmp_path, failure):
    server.script = [failure, failure]
    assert mmhal.parse_rating(make_judge(server, tmp_path).complete("rate this")) == 5
    assert len(server.requests) == 3


def test_judge_failure_raises_and_keeps_finished_judgements(server, tmp_path):
    records = filled(4)
    server.script = ["ok", "ok", "500", "500", "500"]  # record 3 fails on every try
    with pytest.raises(JudgeError, match="failed 3 times .*HTTP 500"):
        tasks.score_mmhal(records, None, judge=make_judge(server, tmp_path), progress=False)
    asked = len(server.requests)
    metrics = tasks.score_mmhal(records, None, judge=make_judge(server, tmp_path), progress=False)
    assert metrics["n"] == 4 and len(server.requests) == asked + 2  # only records 3 and 4 were asked again


def test_judge_timeout_and_refusal(server, tmp_path):
    server.default = "sleep"
    with pytest.raises(JudgeError, match="timed out"):
        make_judge(server, tmp_path, retries=1).complete("rate this")
    with pytest.raises(JudgeError, match="must start with http"):
        Judge("localhost:1", "m", cache_dir=None)
