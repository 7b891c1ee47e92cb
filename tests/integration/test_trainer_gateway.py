"""One online-training round against the real stack: corrections sent through the gateway become a Dense DPO
adapter, published into vLLM's adapter directory, scored through the gateway pinned to the new version, and then
promoted (the gateway serves it) or rejected (the alias stays)."""

from __future__ import annotations

import time

import httpx
import pytest

from online_rl.trainer import OnlineTrainer, TrainerSettings
from tests.integration.conftest import ALICE, SERVICE
from tests.integration.test_gateway_vllm import data_url, image_question, sdk
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld

pytestmark = pytest.mark.slow


def test_corrections_through_the_gateway_train_and_gate_a_version(
    gateway, gateway_store, gateway_store_url, vllm_server
):
    world, client = ShapesWorld(), sdk(gateway)
    corrected = 0
    for index in range(12):
        scene = world.scene("validation", 5000 + index)
        answer = client.chat.completions.create(
            model="llava-rlhf",
            max_tokens=96,
            temperature=0,
            messages=image_question(data_url(world.render(scene)), DESCRIBE_PROMPT),
        )
        truth = world.description(scene, noisy=False)
        if answer.choices[0].message.content.strip() != truth:
            feedback = httpx.post(
                f"{gateway.url}/v1/feedback",
                headers={"Authorization": f"Bearer {ALICE}"},
                json={"response_id": answer.id, "correction": truth},
                timeout=30,
            )
            assert feedback.status_code == 200, feedback.text
            corrected += 1
    assert corrected >= 1, "the bundled model described all 12 scenes perfectly; nothing to correct"

    before = gateway_store.promoted_version("llava-rlhf")
    settings = TrainerSettings(
        store_url=gateway_store_url,
        model=vllm_server.config.model,
        adapter_dir=vllm_server.config.adapter_dir,
        gateway_url=gateway.url,
        api_key=SERVICE,  # the trainer's identity: it gates and promotes (staging first) through the gateway
        group="trainer-integration",
        round_min_pairs=1,
        epochs=2,
        eval_images=8,
    )
    trainer = OnlineTrainer(settings, gateway_store)
    pairs = trainer.poll()
    assert sum(p.source == "correction" for p in pairs) >= corrected
    result = trainer.run_round(pairs)

    adapter = gateway_store.get_adapter(result.version)
    assert set(adapter.metrics) >= {"chair_s", "pope_adversarial_accuracy", "object_recall"}
    assert adapter.algorithm == "dense-dpo" and adapter.parent_version == before
    assert gateway_store.pending_count("trainer-integration") == 0
    if result.promoted:
        assert adapter.status == "promoted" and gateway_store.promoted_version("llava-rlhf") == result.version
        deadline = time.monotonic() + 2.0  # the gateway swaps within 2 s of the promotion
        while (
            client.chat.completions.create(
                model="llava-rlhf", max_tokens=4, messages=[{"role": "user", "content": "How many objects are there?"}]
            ).system_fingerprint
            != adapter.name
        ):
            assert time.monotonic() < deadline, "the gateway did not serve the promoted version within 2 s"
        gateway_store.rollback("llava-rlhf", reason="test cleanup")  # leave the alias as the other tests expect
    else:
        assert adapter.status == "rejected" and result.decision.reasons
        assert gateway_store.promoted_version("llava-rlhf") == before
    # The pinned version answers either way, with its name in the fingerprint.
    pinned = client.chat.completions.create(
        model=f"llava-rlhf@v{result.version}",
        max_tokens=4,
        messages=[{"role": "user", "content": "How many objects are there?"}],
    )
    assert pinned.system_fingerprint == adapter.name


def test_a_ppo_round_on_traffic_through_the_gateway_is_scored_and_gated(
    gateway, gateway_store, gateway_store_url, vllm_server, tmp_path
):
    """Users' prompts and the facts they register go through the gateway; the worker's PPO round trains on them,
    publishes into vLLM's adapter directory and is scored through the gateway pinned to the new version."""
    import base64
    import hashlib

    from training.reward_model import new_reward_model, save_reward_model

    world, client = ShapesWorld(), sdk(gateway)
    for index in range(4):
        scene = world.scene("validation", 6000 + index)
        url = data_url(world.render(scene))
        question = DESCRIBE_PROMPT if index % 2 == 0 else "Is there a moon in the image?"
        client.chat.completions.create(model="llava-rlhf", max_tokens=16, messages=image_question(url, question))
        sha = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
        facts = httpx.post(
            f"{gateway.url}/v1/images/{sha}/facts",
            headers={"Authorization": f"Bearer {ALICE}"},
            json={"facts": world.facts(scene)},
            timeout=30,
        )
        assert facts.status_code == 200, facts.text
    reward, _ = new_reward_model(vllm_server.config.model, lora_rank=4, seed=0)
    reward_dir = save_reward_model(
        reward, tmp_path / "reward", {"with_facts": True, "base_model": vllm_server.config.model}
    )

    before = gateway_store.promoted_version("llava-rlhf")
    settings = TrainerSettings(
        store_url=gateway_store_url,
        model=vllm_server.config.model,
        adapter_dir=vllm_server.config.adapter_dir,
        gateway_url=gateway.url,
        api_key=SERVICE,
        algorithm="ppo",
        reward_model=reward_dir,
        ppo_steps=2,
        ppo_rollout_batch=4,
        ppo_min_prompts=4,
        eval_images=8,
    )
    result = OnlineTrainer(settings, gateway_store).run_ppo_round()

    adapter = gateway_store.get_adapter(result.version)
    assert adapter.algorithm == "ppo" and adapter.parent_version == before
    assert set(adapter.metrics) >= {"chair_s", "pope_adversarial_accuracy", "object_recall"}
    assert adapter.status == ("promoted" if result.promoted else "rejected")
    if result.promoted:
        gateway_store.rollback("llava-rlhf", reason="test cleanup")  # leave the alias as the other tests expect
    pinned = client.chat.completions.create(
        model=f"llava-rlhf@v{result.version}",
        max_tokens=4,
        messages=[{"role": "user", "content": "How many objects are there?"}],
    )
    assert pinned.system_fingerprint == adapter.name


def test_a_round_gated_on_pope_files_and_held_out_feedback_through_the_real_stack(
    gateway, gateway_store, gateway_store_url, vllm_server, tmp_path
):
    """POPE-format question files about rendered scenes, answered by vLLM through the gateway pinned to each version,
    and the held-out slice of the corrections, scored in-process: the registry keeps both suites' metrics."""
    import json

    from online_rl.holdout import all_pairs, is_held_out

    world, client = ShapesWorld(), sdk(gateway)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    lines = {"random": [], "adversarial": []}
    for index in range(6):
        scene = world.scene("validation", 7000 + index)
        name = f"COCO_val2014_{index:012d}.jpg"
        world.render(scene).save(image_dir / name, format="PNG")  # the loader reads any image format
        absent = [shape for shape in ("star", "moon", "heart", "diamond") if shape not in scene.shapes]
        probes = {"random": sorted(scene.shapes)[0], "adversarial": absent[0] if absent else sorted(scene.shapes)[-1]}
        for setting, shape in probes.items():
            label = "yes" if shape in scene.shapes else "no"
            text = world.presence_item(shape, label == "yes").question
            lines[setting].append(json.dumps({"question_id": index, "image": name, "text": text, "label": label}))
        answer = client.chat.completions.create(
            model="llava-rlhf",
            max_tokens=96,
            temperature=0,
            messages=image_question(data_url(world.render(scene)), DESCRIBE_PROMPT),
        )
        truth = world.description(scene, noisy=False)
        if answer.choices[0].message.content.strip() != truth:
            httpx.post(
                f"{gateway.url}/v1/feedback",
                headers={"Authorization": f"Bearer {ALICE}"},
                json={"response_id": answer.id, "correction": truth},
                timeout=30,
            ).raise_for_status()
    files = []
    for setting, rows in lines.items():
        files.append(tmp_path / f"coco_pope_{setting}.json")
        files[-1].write_text("\n".join(rows) + "\n")

    before = gateway_store.promoted_version("llava-rlhf")
    settings = TrainerSettings(
        store_url=gateway_store_url,
        model=vllm_server.config.model,
        adapter_dir=vllm_server.config.adapter_dir,
        gateway_url=gateway.url,
        api_key=SERVICE,
        group="trainer-real-suites",
        round_min_pairs=1,
        epochs=2,
        gate_suites="pope,feedback-holdout",
        gate_pope_files=",".join(map(str, files)),
        gate_pope_image_dir=image_dir,
        gate_holdout_share=0.3,
    )
    trainer = OnlineTrainer(settings, gateway_store)
    pairs = trainer.poll()
    held = [pair for pair in all_pairs(gateway_store) if is_held_out(pair, 0.3)]
    assert pairs and not [pair for pair in pairs if is_held_out(pair, 0.3)]
    result = trainer.run_round(pairs)

    adapter = gateway_store.get_adapter(result.version)
    gate = adapter.gate
    assert {"pope/random_accuracy", "pope/adversarial_accuracy", "pope/f1"} <= set(gate["differences"])
    assert "feedback-holdout/reward_accuracy" in gate["differences"] and "chair_s" not in gate["differences"]
    for difference in gate["differences"].values():
        assert difference["low"] <= difference["difference"] <= difference["high"]
    assert gate["suites"]["pope"]["metrics"]["num_questions"] == 12
    assert gate["suites"]["feedback-holdout"]["metrics"]["num_pairs"] == len(
        {(p.chosen, p.rejected, str(p.messages)) for p in held}
    )
    assert adapter.status == ("promoted" if result.promoted else "rejected")
    if result.promoted:
        gateway_store.rollback("llava-rlhf", reason="test cleanup")
    assert gateway_store.promoted_version("llava-rlhf") == before
