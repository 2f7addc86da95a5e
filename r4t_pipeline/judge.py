"""Optional LLM judge (paper Appendix B.1/E) through any OpenAI-compatible chat-completions endpoint.

Off by default: the offline evaluation uses embedding proxies. The rubric is `assets/prompts/judge.txt`
(1-5 Likert for diversity, query-collection alignment and groundedness, reported x20 as 0-100); results
are shown in random order and the prompt never names the retrieval method.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request

from r4t_pipeline.paths import assets_dir

DIMENSIONS = ("diversity", "alignment", "groundedness")
_JSON = re.compile(r"\{[^{}]*\}", re.S)


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something that is not the rubric's JSON."""


class LLMJudge:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 seed: int = 0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env, "")
        self.timeout, self.rng = timeout, random.Random(seed)
        self.template = (assets_dir() / "prompts" / "judge.txt").read_text(encoding="utf-8")

    def score(self, query: str, results: list[tuple[str, str]]) -> dict[str, float]:
        """results: (direction, retrieved item) pairs. Returns each dimension on 0-100 (Likert x 20)."""
        shuffled = results[:]
        self.rng.shuffle(shuffled)  # no position bias
        lines = "\n".join(f"- direction: {d} | result: {r}" for d, r in shuffled)
        answer = self._complete(self.template.format(query=query, results=lines))
        found = _JSON.findall(answer)
        try:
            scores = json.loads(found[-1])
            return {name: 20.0 * float(scores[name]) for name in DIMENSIONS}
        except (IndexError, ValueError, KeyError, TypeError):
            raise JudgeError(f"judge at {self.url} did not answer the rubric's JSON: {answer[:200]!r}") from None

    def _complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as err:
            raise JudgeError(f"judge request to {self.url} failed: {err}") from None
