"""The bundled model on a real vLLM CPU server, through the official openai client."""

import base64
import io

import openai
import pytest

from training.shapes_world import Scene, SceneObject, ShapesWorld

pytestmark = pytest.mark.slow


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client, model, image, question, max_tokens=8) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=max_tokens,
        temperature=0,
    )
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=f"{vllm_server.base_url}/v1", api_key="unused")


def test_models_endpoint_lists_the_bundled_model(client):
    models = client.models.list().data
    assert models[0].id == "shapes-llava"
    assert all(m.model_extra.get("parent") == "shapes-llava" for m in models[1:])  # adapters other tests loaded


@pytest.mark.parametrize("color", ["red", "blue", "green", "yellow"])
def test_served_model_names_the_color_of_a_rendered_shape(client, color):
    world = ShapesWorld()
    scene = Scene("test", 0, (SceneObject("square", color, "large", 1, 1),))
    answer = ask(client, "shapes-llava", world.render(scene), "What color is the square?")
    assert answer.strip().rstrip(".").lower() == color


def test_served_model_streams_a_description(client):
    world = ShapesWorld()
    scene = Scene("test", 1, (SceneObject("circle", "blue", "large", 0, 0), SceneObject("star", "red", "large", 2, 2)))
    stream = client.chat.completions.create(
        model="shapes-llava",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(world.render(scene))}},
                    {"type": "text", "text": "Describe the image in detail."},
                ],
            }
        ],
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    text = "".join(chunks)
    assert len([c for c in chunks if c]) > 3
    assert text.strip().startswith("There are two objects.")  # vLLM keeps the first token's leading space
