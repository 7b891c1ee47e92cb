"""What the demo's buttons do, apart from the page's layout: plain methods on a `ChatSession`, tested without a
browser against the real gateway app.

Streaming actions yield dicts of named updates (`chatbot`, `status`, `correction`, ...); `demo.app` maps the names
onto its components. Every failure of the API becomes a `status` line, never a traceback, and leaves the
conversation as it was before the failed request.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Iterator

import pandas as pd
from PIL import Image

from alignloop.client import TWO_ANSWERS_TEMPERATURE, Answer, GatewayClient, GatewayError, image_data_url
from demo.text_diff import word_diff
from training.evaluation.metrics import opposite_answer
from training.shapes_world import ShapesWorld

logger = logging.getLogger(__name__)

NO_ANSWER_YET = "Ask something first; the latest answer appears here."


@dataclasses.dataclass
class AnswerRef:
    """An answer on the page: where the chat shows it, and what the API needs to judge it."""

    display_index: int
    response_id: str
    version: str
    text: str


@dataclasses.dataclass
class ChatSession:
    """One browser tab's state: the messages as the API sees them, and the conversation as the page shows it.

    `user` is a random end-user id per tab, sent as OpenAI's `user` field, so the store tells demo users apart even
    though they share the demo's API key."""

    user: str = dataclasses.field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:16]}")
    api_messages: list[dict] = dataclasses.field(default_factory=list)
    display: list[dict] = dataclasses.field(default_factory=list)
    answers: list[AnswerRef] = dataclasses.field(default_factory=list)
    selected: int | None = None  # index into `answers` of the answer the correction box holds
    image_url: str | None = None
    image_sent: bool = False
    facts_sent: str = ""
    compared: dict[str, Answer] = dataclasses.field(default_factory=dict)

    def answer_at(self, display_index: int) -> AnswerRef | None:
        return next((a for a in self.answers if a.display_index == display_index), None)


def version_tag(version: str | None) -> str:
    return f"\n\n<sub>answered by {version or 'unknown version'}</sub>"


def parse_facts(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def ok(message: str) -> str:
    return f"Done: {message}"


def problem(message: str) -> str:
    return f"Error: {message}"


def safely(updates: Iterator[dict]) -> Iterator[dict]:
    """Passes an action's updates through; a failure becomes a last status update, never a traceback."""
    try:
        yield from updates
    except GatewayError as error:
        yield {"status": problem(str(error))}
    except Exception:  # a bug in the demo: log it, keep the page usable
        logger.exception("demo action failed")
        yield {"status": problem("The demo hit an unexpected error; the server log has the details.")}


def user_content(text: str, image_url: str | None) -> str | list[dict]:
    if image_url is None:
        return text
    return [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]


CHARTED_METRICS = {"chair_s": "CHAIR_s", "pope_adversarial_accuracy": "POPE-adversarial", "object_recall": "recall"}


def metrics_frame(versions: list[dict]) -> pd.DataFrame:
    """Long-format rows (version, metric, value) of the gate's three metrics, for the version chart: the base model
    first (from the gate of the first version that was compared with it), then each version, in order."""
    rows = []
    base = next((v["gate"] for v in versions if (v.get("gate") or {}).get("baseline") == "base"), None)
    if base and base.get("differences"):
        rows += [
            {"version": "base", "metric": label, "value": float(base["differences"][name]["baseline"])}
            for name, label in CHARTED_METRICS.items()
            if name in base["differences"]
        ]
    rows += [
        {"version": f"v{v['version']}", "metric": label, "value": float(v["metrics"][name])}
        for v in versions
        for name, label in CHARTED_METRICS.items()
        if name in v.get("metrics", {})
    ]
    return pd.DataFrame(rows, columns=["version", "metric", "value"])


def _difference(gate: dict, metric: str) -> str:
    d = (gate.get("differences") or {}).get(metric)
    if not d:
        return ""
    return f"{d['candidate']:.3f} ({d['difference']:+.3f}; {d['low']:+.2f}..{d['high']:+.2f})"


def versions_table(versions: list[dict]) -> pd.DataFrame:
    """One row per version, newest first: its status; each gate metric as the version's value (its difference from
    the version it would replace; the 95% interval of that difference); the decision: what it was compared with, the
    reasons, the metrics of the other gate suites (`suite/metric`, e.g. pope/f1) in the same form, and the pairs it
    was trained on."""
    columns = ["version", "status", *CHARTED_METRICS.values(), "decision"]
    rows = []
    for v in reversed(versions):
        gate = v.get("gate") or {}
        canary = gate.get("canary") or {}
        reasons = gate.get("reasons") or ([gate["error"]] if gate.get("error") else [])
        if canary.get("reason"):
            reasons = [*reasons, f"canary: {canary['reason']}"]
        pairs = ", ".join(f"{n} {source}" for source, n in sorted((v.get("pair_sources") or {}).items()))
        suites = "; ".join(f"{name} {_difference(gate, name)}" for name in gate.get("differences") or {} if "/" in name)
        parts = [
            f"vs {gate['baseline']}" if gate.get("baseline") else "",
            "; ".join(reasons),
            suites,
            pairs and f"pairs: {pairs}",
        ]
        if gate.get("seconds") is not None:
            parts.append(f"gate {gate['seconds']:.0f} s")
        rows.append(
            {
                "version": f"v{v['version']}",
                "status": v.get("status", ""),
                **{label: _difference(gate, name) for name, label in CHARTED_METRICS.items()},
                "decision": " | ".join(part for part in parts if part),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def write_versions_chart(frame: pd.DataFrame, path) -> None:
    """A PNG line chart of `metrics_frame` rows: one line per metric across versions."""
    from pathlib import Path

    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5), layout="constrained")
    axes = figure.add_subplot()
    colors = {"CHAIR_s": "tab:red", "POPE-adversarial": "tab:blue", "recall": "tab:green"}
    for label, rows in frame.groupby("metric", sort=False):  # versions as categories, in order
        axes.plot(rows["version"], rows["value"], marker="o", label=label, color=colors.get(label))
    axes.set_xlabel("version")
    axes.set_ylim(0, 1.05)
    axes.set_title("Gate metrics per version (CHAIR_s: lower is better)")
    axes.legend(loc="center right")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def version_summary(overview: dict) -> str:
    promoted_at = overview.get("promoted_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(promoted_at)) if promoted_at else "never promoted"
    lines = [
        f"**`{overview['alias']}` serves:** {overview['current']} (since {when})",
        f"**Feedback since then:** {overview['feedback_since_promotion']} events",
    ]
    if overview.get("canary"):
        canary = overview["canary"]
        lines.append(f"**Canary:** policy-v{canary['version']} gets {canary['fraction']:.0%} of traffic")
    if not overview.get("data"):
        lines.append("No adapter versions yet: the base model answers.")
    for row in versions_table(overview.get("data", [])).to_dict("records"):
        lines.append(f"**{row['version']}** {row['status']}: {row['decision']}")
    return "  \n".join(lines)


class DemoActions:
    def __init__(
        self, client: GatewayClient, world: ShapesWorld, max_tokens: int, temperature: float, recent_versions: int = 10
    ):
        self.client = client
        self.world = world
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.recent_versions = recent_versions

    # ---- image -------------------------------------------------------------------------------------------------
    def random_scene(self, rng: random.Random | None = None) -> tuple[Image.Image, str]:
        """A new test-split scene (clean, unbiased) and its ground-truth facts, one per line."""
        scene = self.world.scene("test", (rng or random).randrange(10_000, 1_000_000))
        return self.world.render(scene), "\n".join(self.world.facts(scene))

    @staticmethod
    def new_conversation(image: Image.Image | None, user: str | None = None) -> ChatSession:
        """A new image starts a new conversation (the model sees one image per conversation); the tab keeps its user."""
        state = ChatSession(image_url=image_data_url(image) if image is not None else None)
        state.user = user or state.user
        return state

    # ---- chat --------------------------------------------------------------------------------------------------
    def _stream_answer(self, state: ChatSession, model: str) -> Iterator[dict]:
        """Streams the answer to the conversation's last user message. On failure the placeholder goes away again
        and the error propagates."""
        state.display.append({"role": "assistant", "content": "…"})
        display_index = len(state.display) - 1
        answer = None
        try:
            for answer in self.client.stream_chat(
                model, state.api_messages, self.max_tokens, self.temperature, state.user
            ):
                shown = answer.text.strip()  # vLLM keeps the space the first token carries
                state.display[display_index] = {"role": "assistant", "content": shown + version_tag(answer.version)}
                yield {"session": state, "chatbot": state.display}
        except GatewayError:
            del state.display[display_index]
            raise
        text = answer.text.strip()
        state.api_messages.append({"role": "assistant", "content": text})
        state.answers.append(AnswerRef(display_index, answer.response_id, answer.version, text))
        state.selected = len(state.answers) - 1
        yield {
            "session": state,
            "chatbot": state.display,
            "correction": text,
            "correction_target": f"Correcting the latest answer, by **{answer.version}**.",
            "status": ok(f"{answer.version} answered ({answer.finish_reason})."),
        }

    def send(self, state: ChatSession, text: str, model: str) -> Iterator[dict]:
        def updates() -> Iterator[dict]:
            if not text.strip():
                yield {"status": problem("Type a question first.")}
                return
            attach_image = state.image_url is not None and not state.image_sent
            state.api_messages.append(
                {"role": "user", "content": user_content(text, state.image_url if attach_image else None)}
            )
            state.display.append({"role": "user", "content": text})
            yield {"session": state, "chatbot": state.display, "question": "", "status": ""}
            try:
                yield from self._stream_answer(state, model)
            except GatewayError:  # the question goes back to the box, the conversation to where it was
                state.api_messages.pop()
                state.display.pop()
                yield {"session": state, "chatbot": state.display, "question": text}
                raise
            state.image_sent = state.image_sent or attach_image

        return safely(updates())

    def regenerate(self, state: ChatSession, model: str) -> Iterator[dict]:
        def updates() -> Iterator[dict]:
            if not state.answers or state.api_messages[-1]["role"] != "assistant":
                yield {"status": problem("There is no answer to regenerate yet.")}
                return
            last = state.answers.pop()
            removed_message, removed_display = state.api_messages.pop(), state.display.pop(last.display_index)
            try:
                yield from self._stream_answer(state, model)
            except GatewayError:  # keep the old answer
                state.answers.append(last)
                state.api_messages.append(removed_message)
                state.display.insert(last.display_index, removed_display)
                yield {"session": state, "chatbot": state.display}
                raise

        return safely(updates())

    # ---- feedback ----------------------------------------------------------------------------------------------
    def _facts_once(self, state: ChatSession, facts_text: str) -> list[str] | None:
        """The image's facts, sent with the first judgement after they change, not repeated with every one."""
        listed = parse_facts(facts_text)
        return listed if listed and facts_text != state.facts_sent else None

    def thumbs(self, state: ChatSession, display_index: int, liked: bool, facts_text: str = "") -> str:
        answer = state.answer_at(display_index)
        if answer is None:
            return problem("Only answers can be rated.")
        facts = self._facts_once(state, facts_text)
        try:
            event = self.client.feedback(answer.response_id, rating=1 if liked else -1, facts=facts, user=state.user)
        except GatewayError as error:
            return problem(str(error))
        state.facts_sent = facts_text if facts else state.facts_sent
        return ok(
            f"Thumbs {'up' if liked else 'down'} saved for the answer by {answer.version} (feedback {event['id']})."
        )

    @staticmethod
    def select(state: ChatSession, display_index: int) -> tuple[str, str] | None:
        """Puts the clicked answer into the correction box: (its text, the box's heading)."""
        answer = state.answer_at(display_index)
        if answer is None:
            return None
        state.selected = state.answers.index(answer)
        return answer.text, f"Correcting the selected answer, by **{answer.version}**."

    def correct(self, state: ChatSession, text: str, facts_text: str = "") -> tuple[str, list[tuple[str, str | None]]]:
        """Sends the correction of the selected answer; returns the status and the word-level changes."""
        if state.selected is None:
            return problem("There is no answer to correct yet."), []
        answer = state.answers[state.selected]
        corrected = text.strip()
        if not corrected or corrected == answer.text.strip():
            return problem("Edit the answer first: the correction is the same as the answer."), []
        facts = self._facts_once(state, facts_text)
        try:
            event = self.client.feedback(answer.response_id, correction=corrected, facts=facts, user=state.user)
        except GatewayError as error:
            return problem(str(error)), []
        state.facts_sent = facts_text if facts else state.facts_sent
        return ok(f"Correction saved for the answer by {answer.version} (feedback {event['id']})."), word_diff(
            answer.text, corrected
        )

    def flip_yes_no(self, state: ChatSession, facts_text: str = "") -> tuple[str, list[tuple[str, str | None]]]:
        """One click for a wrong yes/no: the selected answer corrected to its opposite ("Yes." -> "No.")."""
        if state.selected is None:
            return problem("There is no answer to correct yet."), []
        opposite = opposite_answer(state.answers[state.selected].text)
        if opposite is None:
            return problem("The answer is not a plain yes or no: edit it and submit the correction instead."), []
        return self.correct(state, opposite, facts_text)

    # ---- side by side ------------------------------------------------------------------------------------------
    def compare(self, state: ChatSession, text: str, model_a: str, model_b: str) -> Iterator[dict]:
        """The same image and question to two models; `answer_a`/`answer_b` updates carry (text, version)."""

        def updates() -> Iterator[dict]:
            state.compared = {}
            if not text.strip():
                yield {"status": problem("Type a question for both versions first.")}
                return
            messages = [{"role": "user", "content": user_content(text, state.image_url)}]
            for key, model in (("a", model_a), ("b", model_b)):
                for answer in self.client.stream_chat(model, messages, self.max_tokens, self.temperature, state.user):
                    yield {f"answer_{key}": (answer.text.strip(), answer.version)}
                state.compared[key] = answer
            yield {"session": state, "status": ok("Both versions answered. Which answer is better?")}

        return safely(updates())

    def two_answers(self, state: ChatSession, text: str, model: str) -> Iterator[dict]:
        """The same image and question, two answers of one version in one request (n=2, sampled at a temperature
        of at least `TWO_ANSWERS_TEMPERATURE` so they can differ); updates as in `compare`, and `prefer` then
        records the better answer against the other."""

        def updates() -> Iterator[dict]:
            state.compared = {}
            if not text.strip():
                yield {"status": problem("Type a question first.")}
                return
            messages = [{"role": "user", "content": user_content(text, state.image_url)}]
            temperature = max(self.temperature, TWO_ANSWERS_TEMPERATURE)
            for a, b in self.client.stream_choices(model, messages, self.max_tokens, temperature, state.user, n=2):
                yield {"answer_a": (a.text.strip(), a.version), "answer_b": (b.text.strip(), b.version)}
            state.compared = {"a": a, "b": b}
            if a.text.strip() == b.text.strip():
                yield {"session": state, "status": problem("Both answers came out the same; ask again.")}
                return
            yield {"session": state, "status": ok(f"Two answers by {a.version}. Which one is better?")}

        return safely(updates())

    def prefer(self, state: ChatSession, key: str) -> str:
        if set(state.compared) != {"a", "b"}:
            return problem("Ask both versions first.")
        better, worse = state.compared[key], state.compared["b" if key == "a" else "a"]
        if better.response_id == worse.response_id:
            return problem("Both answers are the same response; ask again.")
        try:
            event = self.client.preference(
                state.compared["a"].response_id, state.compared["b"].response_id, better.response_id, state.user
            )
        except GatewayError as error:
            return problem(str(error))
        return ok(f"Preference saved: {key.upper()} ({better.version}) over {worse.version} ({event['id']}).")

    # ---- versions ----------------------------------------------------------------------------------------------
    def versions(self) -> tuple[str, pd.DataFrame, pd.DataFrame, list[str]]:
        """The Versions tab: summary text, the chart's rows, the table of recent versions, and the model names."""
        overview = self.client.versions(self.recent_versions)
        data = overview["data"]
        return version_summary(overview), metrics_frame(data), versions_table(data), self.client.models()
