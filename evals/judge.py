"""A text judge behind an OpenAI-compatible chat-completions endpoint, with retries, timeouts and an on-disk cache.

The API key is read from an environment variable at call time and only ever placed in the request header: it is
never logged, cached, written to a manifest or put into an error message.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlmkit.errors import JudgeError
from vlmkit.evals.files import write_atomic

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class Judge:
    """``Judge(url, model).complete(prompt)`` -> the judge's reply text (temperature 0 by default).

    ``url`` is the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` address. Failed calls
    (connection errors, timeouts, HTTP 408/409/429/5xx, replies that are not a chat completion) are retried
    ``retries`` times with exponential backoff (``backoff * 2**k`` seconds, or the server's Retry-After when it
    is shorter than ``max_wait``); then :class:`JudgeError`. Other HTTP errors fail at once. Replies are cached
    in ``cache_dir`` (one JSON file per request, keyed by the sha256 of the request body), so a re-run never pays
    for a judgement twice and an interrupted run loses nothing it already got.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", cache_dir: str | Path | None,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, max_wait: float = 60.0,
                 temperature: float = 0.0, max_tokens: int = 1024):
        if not url.startswith(("http://", "https://")):
            raise JudgeError(f"judge URL {url!r} must start with http:// or https://")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.timeout, self.retries, self.backoff, self.max_wait = timeout, retries, backoff, max_wait
        self.temperature, self.max_tokens = temperature, max_tokens

    @property
    def id(self) -> str:
        """What identifies the judge in a manifest (no secrets)."""
        return f"{self.model} @ {self.url} (temperature {self.temperature})"

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        payload = json.dumps(body, sort_keys=True).encode()
        cache = self.cache_dir / f"{hashlib.sha256(payload).hexdigest()}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            try:
                return json.loads(cache.read_text())["reply"]
            except (json.JSONDecodeError, KeyError, OSError):
                cache.unlink(missing_ok=True)  # a torn cache entry: ask again
        reply = self._post(payload)
        if cache is not None:
            write_atomic(cache, json.dumps({"request": body, "reply": reply}))
        return reply

    def _post(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        problem = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return _reply_text(raw)
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise JudgeError(f"judge {self.url} refused the request (HTTP {error.code}); check the API key "
                                     f"in ${self.api_key_env}") from None
                if error.code not in RETRY_STATUS:
                    raise JudgeError(f"judge {self.url} answered HTTP {error.code}; check --judge-url and "
                                     "--judge-model") from None
                problem = f"HTTP {error.code}"
                retry_after = error.headers.get("Retry-After", "") if error.headers else ""
                if retry_after.replace(".", "", 1).isdigit() and float(retry_after) <= self.max_wait:
                    wait = float(retry_after)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                problem = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else \
                    f"connection failed ({reason})"
            except ValueError as error:
                problem = f"unusable reply ({error})"
            if attempt < self.retries:
                time.sleep(min(wait, self.max_wait))
        raise JudgeError(f"judge {self.url} failed {self.retries + 1} times (last: {problem}); finished judgements "
                         "are cached, re-run the same command when the endpoint is back")


def _reply_text(raw: bytes) -> str:
    """The message text of a chat-completions response (ValueError when it is not one)."""
    try:
        data = json.loads(raw)
        text = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise ValueError("not a chat-completions JSON response") from None
    if not isinstance(text, str):
        raise ValueError("the message content is not text")
    return text
