"""The one client of alignloop's HTTP API, and of any OpenAI-compatible endpoint: everything that reaches the
service from outside (the demo page, the simulated users, evaluation through an endpoint, the trainer's gate, an
external judge) goes through this module, over HTTP, and imports nothing else of alignloop.

- `ChatEndpoint`: any OpenAI-compatible server (vLLM, the gateway, a judge model): a reachability check, and one
  non-streamed chat answer at a time, retried with exponential backoff (tenacity) when the failure is transient: a
  refused or reset connection, a timeout, 429 (after its Retry-After) or a 5xx.
- `GatewayClient`: the gateway's whole API as a user sees it: streamed chat (one answer, or `n` answers to one
  request) through the `openai` SDK, and the feedback, preference, facts and versions endpoints; and, with the
  admin or the service key, `promote` (the gateway stages the version on every vLLM replica before the alias
  moves). It turns every failure (the API down, a rejected input, a timeout) into `GatewayError` with one line a
  person can read; a promotion the gateway refused or lost to a concurrent move raises `PromotionConflict`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
from collections.abc import Iterator

import httpx
import openai
import tenacity
from PIL import Image

logger = logging.getLogger(__name__)
DEMO_CLIENT_HEADER = {"x-alignloop-client": "demo"}
EVAL_CLIENT_HEADER = {"x-alignloop-client": "eval"}
TRANSIENT_ERRORS = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)  # timeouts too


class GatewayError(Exception):
    """A failed call to the gateway, with a message fit for the page."""


class PromotionConflict(GatewayError):
    """The gateway did not move the alias: staging failed on a vLLM replica (`code` promote_refused; the refusal is
    in the alias history) or the alias no longer served the expected version (`code` conflict)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# What a call through this module raises when the other side fails or refuses: for callers that report it in one line.
CALL_ERRORS = (openai.APIError, httpx.HTTPError, ConnectionError, TimeoutError, GatewayError)


TWO_ANSWERS_TEMPERATURE = 0.8  # "two answers, pick the better": at temperature 0 both would be the same


@dataclasses.dataclass
class Answer:
    """One answer as it streams in: `text` grows; `response_id` and `version` come with the first chunk."""

    model: str
    text: str = ""
    response_id: str | None = None
    version: str | None = None
    finish_reason: str | None = None


def choice_response_id(response_id: str, index: int) -> str:
    """The id the gateway records choice `index` of an answer under: the response id itself for choice 0, and
    `<id>-<index>` for the others (the gateway's convention for n > 1)."""
    return response_id if index == 0 else f"{response_id}-{index}"


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of the image, the form the gateway always accepts."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _api_error_message(error: Exception, base_url: str) -> str:
    if isinstance(error, openai.APIConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
        return f"The alignloop API at {base_url} is not reachable. Is the gateway running?"
    if isinstance(error, openai.APITimeoutError | httpx.TimeoutException):
        return "The alignloop API did not answer in time. Try again."
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or error.message
        return f"The API refused the request ({error.status_code}): {message}"
    if isinstance(error, httpx.HTTPStatusError):
        try:
            message = error.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = error.response.text[:200]
        return f"The API refused the request ({error.response.status_code}): {message}"
    return f"The API call failed: {error}"


def check_endpoint(client: openai.OpenAI) -> None:
    """Raises ConnectionError when the OpenAI-compatible server cannot be reached or refuses the API key.

    Uses GET /models without retries. A server that has no /models route (404) counts as reachable.
    """
    url = str(client.base_url)
    try:
        client.with_options(max_retries=0, timeout=10.0).models.list()
    except openai.APIConnectionError as error:
        raise ConnectionError(f"cannot reach endpoint {url}: {error.__cause__ or error}") from error
    except openai.APIStatusError as error:
        if error.status_code in (401, 403):
            reason = f"the API key was refused ({error.status_code})"
            raise ConnectionError(f"cannot reach endpoint {url}: {reason}") from error
        if error.status_code != 404:
            raise ConnectionError(f"cannot reach endpoint {url}: GET /models answered {error.status_code}") from error
        logger.warning("endpoint has no /models route url=%s", url)


def retry_wait(state: tenacity.RetryCallState) -> float:
    """A 429's Retry-After when it gives one (at most a minute), else exponential backoff with jitter."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, openai.RateLimitError):
        retry_after = error.response.headers.get("retry-after", "")
        if retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 60.0)
    return tenacity.wait_exponential_jitter(initial=0.5, max=30.0)(state)


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.warning(
        "endpoint call failed error=%s attempt=%d retry_in_s=%.1f",
        type(error).__name__,
        state.attempt_number,
        state.next_action.sleep if state.next_action else 0.0,
    )


class ChatEndpoint:
    """An OpenAI-compatible chat server at `base_url` (ending in /v1): checked once, then asked one request at a time,
    each tried up to `attempts` times while it fails transiently.

    Thread-safe: evaluation sends requests from a thread pool through one endpoint.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "EMPTY",
        timeout: float = 120.0,
        headers: dict | None = None,
        attempts: int = 6,
        http_client: httpx.Client | None = None,
    ):
        self.base_url = base_url
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            default_headers=headers,
            max_retries=0,
            http_client=http_client,
        )
        self.attempts = attempts
        self._checked = False

    def check(self) -> None:
        """Raises ConnectionError unless the endpoint answers; asks only the first time."""
        if not self._checked:
            check_endpoint(self.client)
            self._checked = True

    def chat(self, model: str, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> str:
        """The text of one non-streamed answer; a transient failure is retried, any other one raised at once."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=retry_wait,
            retry=tenacity.retry_if_exception_type(TRANSIENT_ERRORS),
            before_sleep=_log_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                completion = self.client.chat.completions.create(
                    model=model, messages=messages, temperature=temperature, max_tokens=max_tokens
                )
        return completion.choices[0].message.content or ""


def _rate_limited(error: BaseException) -> bool:
    if isinstance(error, openai.RateLimitError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and error.response.status_code == 429


def _retry_after(state: tenacity.RetryCallState) -> float:
    """The 429's Retry-After (at most a minute), else exponential backoff."""
    error = state.outcome.exception() if state.outcome else None
    response = getattr(error, "response", None)
    retry_after = response.headers.get("retry-after", "") if response is not None else ""
    if retry_after.replace(".", "", 1).isdigit():
        return min(float(retry_after), 60.0)
    return tenacity.wait_exponential_jitter(initial=1.0, max=30.0)(state)


class GatewayClient:
    def __init__(
        self,
        gateway_url: str,
        api_key: str,
        timeout_s: float = 120.0,
        http_client: httpx.Client | None = None,
        rate_limit_attempts: int = 1,
    ):
        """`http_client` replaces the HTTP connection in tests (e.g. a TestClient on an in-process gateway). With
        `rate_limit_attempts` > 1, a request refused with 429 waits for its Retry-After and is sent again, up to that
        many times in all (the simulated users do; the demo page shows the refusal)."""
        self.base_url = gateway_url.rstrip("/")
        self.rate_limit_attempts = rate_limit_attempts
        self.http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False)
        self.http.headers.update({"Authorization": f"Bearer {api_key}", **DEMO_CLIENT_HEADER})
        self.openai = openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key,
            max_retries=0,
            default_headers=DEMO_CLIENT_HEADER,
            http_client=self.http,
        )

    def close(self) -> None:
        self.http.close()

    # ---- chat --------------------------------------------------------------------------------------------------
    def stream_chat(
        self, model: str, messages: list[dict], max_tokens: int, temperature: float, user: str | None = None
    ) -> Iterator[Answer]:
        """Yields the same `Answer` after every chunk, its text one delta longer each time."""
        for answers in self.stream_choices(model, messages, max_tokens, temperature, user):
            yield answers[0]

    def stream_choices(
        self,
        model: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        user: str | None = None,
        n: int = 1,
    ) -> Iterator[list[Answer]]:
        """`n` answers to one request (`n` choices), streamed together: yields the same list after every chunk.
        Each answer's `response_id` is the id the gateway records it under, for feedback and preferences."""
        answers = [Answer(model=model) for _ in range(n)]
        extra = {"user": user} if user else {}
        if n > 1:
            extra["n"] = n
        try:
            stream = self._within_rate_limit(
                lambda: self.openai.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True, **extra
                )
            )
            for chunk in stream:
                for choice in chunk.choices:
                    answer = answers[choice.index]
                    answer.response_id = answer.response_id or choice_response_id(chunk.id, choice.index)
                    answer.version = answer.version or chunk.system_fingerprint
                    answer.text += choice.delta.content or ""
                    answer.finish_reason = choice.finish_reason or answer.finish_reason
                yield answers
        except (openai.OpenAIError, httpx.HTTPError) as error:
            raise GatewayError(_api_error_message(error, self.base_url)) from error
        if any(answer.response_id is None for answer in answers):
            raise GatewayError("The API closed the stream before answering. Try again.")

    def ready(self) -> bool:
        """Whether the gateway answers /ready with 200 (a model server is up behind it)."""
        try:
            return self.http.get("/ready", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        try:
            return [model.id for model in self.openai.models.list()]
        except (openai.OpenAIError, httpx.HTTPError) as error:
            raise GatewayError(_api_error_message(error, self.base_url)) from error

    # ---- feedback ----------------------------------------------------------------------------------------------
    def _within_rate_limit(self, call):
        """`call()`, sent again after each 429's Retry-After while `rate_limit_attempts` allow."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.rate_limit_attempts),
            wait=_retry_after,
            retry=tenacity.retry_if_exception(_rate_limited),
            reraise=True,
        )
        return retrying(call)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        def send() -> dict:
            response = self.http.request(method, path, **kwargs)
            response.raise_for_status()
            return response.json()

        try:
            return self._within_rate_limit(send)
        except httpx.HTTPError as error:
            raise GatewayError(_api_error_message(error, self.base_url)) from error

    def feedback(
        self,
        response_id: str,
        rating: int | None = None,
        correction: str | None = None,
        comment: str | None = None,
        facts: list[str] | None = None,
        user: str | None = None,
    ) -> dict:
        body = {
            "response_id": response_id,
            "rating": rating,
            "correction": correction,
            "comment": comment,
            "facts": facts or None,
            "user": user,
        }
        return self._request("POST", "/v1/feedback", json={k: v for k, v in body.items() if v is not None})

    def preference(self, first_id: str, second_id: str, preferred_id: str, user: str | None = None) -> dict:
        body = {"response_ids": [first_id, second_id], "preferred_id": preferred_id, "user": user}
        return self._request("POST", "/v1/preferences", json={k: v for k, v in body.items() if v is not None})

    def facts(self, image_sha256: str, caption: str | None = None, facts: list[str] | None = None) -> dict:
        """Registers what is true of an image this key has sent (its sha256 is that of the image's bytes)."""
        body = {"caption": caption, "facts": facts or None}
        return self._request(
            "POST", f"/v1/images/{image_sha256}/facts", json={k: v for k, v in body.items() if v is not None}
        )

    def versions(self, recent: int) -> dict:
        return self._request("GET", "/v1/versions", params={"recent": recent})

    # ---- operations (the admin key or the service key) -------------------------------------------------------------
    def promote(
        self,
        alias: str,
        version: int | None,
        expected: int | None,
        reason: str = "",
        actor: str | None = None,
        require_effect: bool = True,
    ) -> dict:
        """Moves `alias` to `version` (None: the base model) if it still serves `expected`, after the gateway has
        staged the version on every healthy vLLM replica. Returns the alias change (with the staging report);
        raises PromotionConflict when the gateway refused or the alias moved meanwhile, GatewayError otherwise.
        `actor` names the promoter in the alias history (service key only); `require_effect=False` lets a version
        whose answers equal the base model's through staging."""
        body = {"version": version, "expected_version": expected, "check_expected": True, "reason": reason}
        body |= {"require_effect": require_effect} | ({"actor": actor} if actor else {})
        try:
            response = self.http.post(f"/v1/admin/aliases/{alias}/promote", json=body)
        except httpx.HTTPError as error:
            raise GatewayError(_api_error_message(error, self.base_url)) from error
        if response.status_code == 409:
            try:
                detail = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                detail = {"message": response.text[:300], "code": "conflict"}
            raise PromotionConflict(detail.get("message") or "promotion refused", detail.get("code") or "conflict")
        try:
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise GatewayError(_api_error_message(error, self.base_url)) from error
