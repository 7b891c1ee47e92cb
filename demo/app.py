"""The browser demo: a Gradio Blocks page for chatting with the served model and judging its answers.

The page talks to the gateway only over HTTP (`alignloop.client.GatewayClient`); it never imports the model. It offers:

- an image: uploaded, picked from bundled ShapesWorld test scenes, or a new random scene (whose ground truth fills
  the facts box);
- a multi-turn chat with streamed answers, regenerate and clear; every answer says which adapter version wrote it;
- thumbs under every answer, and "Correct this answer": an editable copy of an answer whose submission sends a
  correction (RLHF-V's fine-grained feedback) and then shows which words changed;
- side by side: one question to two versions, or two answers of one version to one request (n=2), and the better
  answer recorded as a preference;
- a version panel: the version the alias serves, feedback since its promotion, and recent versions' eval metrics.

`build_demo(settings)` builds the page; `mount_demo(app, settings)` puts it at `/` on the gateway (`alignloop up`);
`alignloop demo` runs it alone in front of any gateway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from alignloop.client import GatewayClient, GatewayError
from demo.actions import (
    NO_ANSWER_YET,
    ChatSession,
    DemoActions,
    metrics_frame,
    problem,
    versions_table,
)
from demo.settings import DemoSettings
from training.shapes_world import ShapesWorld

logger = logging.getLogger(__name__)
CHART_COLORS = {"CHAIR_s": "#d62728", "POPE-adversarial": "#1f77b4", "recall": "#2ca02c"}

DEFAULT_QUESTION = "Describe the image in detail."
CHAT_OUTPUTS = ("session", "chatbot", "question", "status", "correction", "correction_target")
CSS = """
#status:empty { display: none; }
@media (max-width: 640px) { .gradio-container { padding: 4px !important; } }
"""


def example_scenes(world: ShapesWorld, settings: DemoSettings) -> list[list[str]]:
    """The first test scenes, rendered once into `examples_dir`, each with its ground-truth facts."""
    directory = Path(settings.examples_dir)
    directory.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, scene in enumerate(world.scenes("test", settings.num_examples)):
        path = directory / f"shapes-test-{index}.png"
        if not path.exists():
            world.render(scene).save(path)
        examples.append([str(path.resolve()), "\n".join(world.facts(scene))])
    return examples


def _index(event: gr.EventData) -> int:
    index = event.index
    return index if isinstance(index, int) else index[0]


def build_demo(
    settings: DemoSettings, client: GatewayClient | None = None, world: ShapesWorld | None = None
) -> gr.Blocks:
    client = client or GatewayClient(
        settings.gateway_url, settings.api_key.get_secret_value(), settings.request_timeout_s
    )
    world = world or ShapesWorld()
    actions = DemoActions(client, world, settings.max_tokens, settings.temperature, settings.recent_versions)
    alias = settings.public_alias
    examples = example_scenes(world, settings)

    with gr.Blocks(title="alignloop demo", fill_width=True) as page:
        session = gr.State(lambda: ChatSession())  # noqa: PLW0108 (gradio would take the dataclass type itself as the value)
        gr.Markdown(
            "# alignloop\nAsk about an image, then rate or correct the answers. Your feedback trains the next version."
        )
        status = gr.Markdown("", elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                image = gr.Image(
                    type="pil", label="Image", sources=["upload", "clipboard"], height=300, elem_id="image"
                )
                new_scene = gr.Button("New random scene", elem_id="new-scene")
                facts = gr.Textbox(
                    label="Facts about the image (optional, one per line)",
                    lines=4,
                    elem_id="facts",
                    placeholder="e.g. There is one small red star in the top left.",
                )
                if examples:
                    gr.Examples(examples=examples, inputs=[image, facts], label="ShapesWorld examples")
            with gr.Column(scale=2, min_width=300):
                with gr.Tab("Chat"):
                    model = gr.Dropdown(
                        choices=[alias, "base"],
                        value=alias,
                        label="Model",
                        allow_custom_value=True,
                        elem_id="chat-model",
                    )
                    chatbot = gr.Chatbot(
                        label="Conversation",
                        height=380,
                        elem_id="chatbot",
                        buttons=["copy_all"],
                        feedback_options=("Like", "Dislike"),
                    )
                    question = gr.Textbox(label="Your question", value=DEFAULT_QUESTION, lines=1, elem_id="question")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear", elem_id="clear")
                    with gr.Accordion("Correct this answer", open=True):
                        correction_target = gr.Markdown("Ask something first; the latest answer appears here.")
                        correction = gr.Textbox(
                            label="Corrected answer",
                            info="Edit only what is wrong. Name what is really there instead of deleting a sentence.",
                            lines=3,
                            elem_id="correction",
                        )
                        with gr.Row():
                            submit_correction = gr.Button("Submit correction", elem_id="submit-correction")
                            flip_answer = gr.Button("Wrong yes/no: flip it", elem_id="flip-yes-no")
                        changes = gr.HighlightedText(
                            label="What the correction changed",
                            elem_id="changes",
                            color_map={"removed": "red", "added": "green"},
                        )
                with gr.Tab("Side by side"):
                    compare_question = gr.Textbox(
                        label="Question for both versions", value=DEFAULT_QUESTION, elem_id="compare-question"
                    )
                    with gr.Row():
                        model_a = gr.Dropdown(
                            choices=[alias, "base"],
                            value=alias,
                            label="Version A",
                            allow_custom_value=True,
                            elem_id="model-a",
                        )
                        model_b = gr.Dropdown(
                            choices=[alias, "base"],
                            value="base",
                            label="Version B",
                            allow_custom_value=True,
                            elem_id="model-b",
                        )
                    ask_both = gr.Button("Ask both", variant="primary", elem_id="ask-both")
                    two_answers = gr.Button("Two answers from version A, pick the better", elem_id="two-answers")
                    with gr.Row():
                        answer_a = gr.Textbox(label="Answer A", lines=5, interactive=False, elem_id="answer-a")
                        answer_b = gr.Textbox(label="Answer B", lines=5, interactive=False, elem_id="answer-b")
                    with gr.Row():
                        prefer_a = gr.Button("A is better", elem_id="prefer-a")
                        prefer_b = gr.Button("B is better", elem_id="prefer-b")
                with gr.Tab("Versions"):
                    summary = gr.Markdown("Loading…", elem_id="version-summary")
                    chart = gr.LinePlot(
                        metrics_frame([]),
                        x="version",
                        y="value",
                        color="metric",
                        color_map=CHART_COLORS,
                        label="CHAIR_s (red, lower is better), POPE-adversarial (blue) and recall (green) on the gate",
                        y_lim=[0, 1],
                        height=360,
                        elem_id="version-chart",
                    )
                    table = gr.Dataframe(
                        versions_table([]),
                        label="Versions: gate metrics (difference, 95% interval) against the version each replaced",
                        interactive=False,
                        wrap=True,
                        elem_id="version-table",
                    )
                    refresh = gr.Button("Refresh versions", elem_id="refresh-versions")

        # ---- wiring: each handler calls one action and maps its named updates onto components ---------------
        def as_tuples(updates, names):
            for update in updates:
                yield tuple(update.get(name, gr.update()) for name in names)

        def image_changed(picture, state):
            return actions.new_conversation(picture, state.user), [], "", NO_ANSWER_YET, []

        def send_message(text, model_name, state):
            yield from as_tuples(actions.send(state, text, model_name), CHAT_OUTPUTS)

        def regenerate_last(model_name, state):
            yield from as_tuples(actions.regenerate(state, model_name), CHAT_OUTPUTS)

        def clear_chat(state):
            return ChatSession(user=state.user, image_url=state.image_url), [], "", NO_ANSWER_YET, [], ""

        def thumbs(state, facts_text, like: gr.LikeData):
            if like.liked not in (True, False):  # a thumb taken back: nothing to record
                return state, gr.update()
            return state, actions.thumbs(state, _index(like), like.liked, facts_text)

        def select_answer(state, selected: gr.SelectData):
            chosen = actions.select(state, _index(selected))
            return (state, *chosen) if chosen else (state, gr.update(), gr.update())

        def send_correction(text, facts_text, state):
            status_text, diff = actions.correct(state, text, facts_text)
            return state, status_text, diff

        def compare(text, name_a, name_b, state):
            yield gr.update(), gr.update(value="", label="Answer A"), gr.update(value="", label="Answer B"), ""
            for update in actions.compare(state, text, name_a, name_b):
                row = []
                for key in ("a", "b"):
                    if f"answer_{key}" in update:
                        answer_text, version = update[f"answer_{key}"]
                        row.append(gr.update(value=answer_text, label=f"Answer {key.upper()}, by {version}"))
                    else:
                        row.append(gr.update())
                yield update.get("session", gr.update()), *row, update.get("status", gr.update())

        def pick_better(text, name_a, state):
            """Two answers of version A to one request (n=2) in the A and B boxes; "A/B is better" then records it."""
            yield gr.update(), gr.update(value="", label="Answer A"), gr.update(value="", label="Answer B"), ""
            for update in actions.two_answers(state, text, name_a):
                row = [
                    gr.update(
                        value=update[f"answer_{key}"][0], label=f"Answer {key.upper()}, by {update[f'answer_{key}'][1]}"
                    )
                    if f"answer_{key}" in update
                    else gr.update()
                    for key in ("a", "b")
                ]
                yield update.get("session", gr.update()), *row, update.get("status", gr.update())

        def load_versions():
            try:
                summary_text, frame, rows, names = actions.versions()
            except GatewayError as error:
                return (problem(str(error)), *[gr.update()] * 5)
            choices = gr.update(choices=names)
            in_order = gr.update(value=frame, sort=list(dict.fromkeys(frame["version"])))  # base, v1, v2, ..., v10
            return summary_text, in_order, rows, choices, choices, choices

        chat_outputs = [session, chatbot, question, status, correction, correction_target]  # CHAT_OUTPUTS' order
        new_scene.click(actions.random_scene, outputs=[image, facts])
        image.change(
            image_changed, inputs=[image, session], outputs=[session, chatbot, correction, correction_target, changes]
        )
        send.click(send_message, inputs=[question, model, session], outputs=chat_outputs)
        question.submit(send_message, inputs=[question, model, session], outputs=chat_outputs)
        regenerate.click(regenerate_last, inputs=[model, session], outputs=chat_outputs)
        clear.click(
            clear_chat, inputs=[session], outputs=[session, chatbot, correction, correction_target, changes, status]
        )
        chatbot.like(thumbs, inputs=[session, facts], outputs=[session, status])
        chatbot.select(select_answer, inputs=[session], outputs=[session, correction, correction_target])
        flip_answer.click(
            lambda facts_text, state: (state, *actions.flip_yes_no(state, facts_text)),
            inputs=[facts, session],
            outputs=[session, status, changes],
        )
        submit_correction.click(
            send_correction, inputs=[correction, facts, session], outputs=[session, status, changes]
        )
        ask_both.click(
            compare, inputs=[compare_question, model_a, model_b, session], outputs=[session, answer_a, answer_b, status]
        )
        two_answers.click(
            pick_better, inputs=[compare_question, model_a, session], outputs=[session, answer_a, answer_b, status]
        )
        prefer_a.click(lambda state: actions.prefer(state, "a"), inputs=[session], outputs=[status])
        prefer_b.click(lambda state: actions.prefer(state, "b"), inputs=[session], outputs=[status])
        version_outputs = [summary, chart, table, model, model_a, model_b]
        refresh.click(load_versions, outputs=version_outputs)
        page.load(load_versions, outputs=version_outputs)
        gr.Timer(15).tick(load_versions, outputs=version_outputs)
    return page


def mount_demo(app, settings: DemoSettings):
    """Mounts the demo at `/` on an ASGI app (the gateway, in `alignloop up`)."""
    page = build_demo(settings)
    return gr.mount_gradio_app(
        app,
        page,
        path="/",
        footer_links=[],
        run_history=False,
        css=CSS,
        max_file_size=f"{settings.max_upload_mb}mb",
        show_error=False,
    )


def run_demo(settings: DemoSettings) -> int:
    """`alignloop demo`: the page alone, in front of the gateway at `settings.gateway_url`."""
    page = build_demo(settings)
    page.queue().launch(
        server_name=settings.host,
        server_port=settings.port,
        footer_links=[],
        css=CSS,
        max_file_size=f"{settings.max_upload_mb}mb",
        show_error=False,
    )
    return 0
