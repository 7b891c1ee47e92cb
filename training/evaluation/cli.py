"""`alignloop eval`: score a model on ShapesWorld, or on real images: POPE, MMHal-Bench (with a judge) or CHAIR (with
COCO-style annotations), in-process or through an endpoint.

The model under test is either a local checkpoint (`--model DIR`, run with transformers) or anything served behind
an OpenAI-compatible API (`--endpoint URL --served-model NAME`: the vLLM server, the gateway, a pinned adapter
version), so every version is scored the same way. This module only parses flags and wires the pieces; it imports
nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from alignloop.settings import DEFAULT_PUBLIC_ALIAS

logger = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=("shapes", "mmhal", "pope", "chair"), default="shapes")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--model", type=Path, help="a local LLaVA checkpoint directory, run with transformers")
    backend.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--served-model", default=DEFAULT_PUBLIC_ALIAS, help="model name to request from --endpoint")
    parser.add_argument(
        "--api-key-env", default="ALIGNLOOP_API_KEY", help="environment variable holding the endpoint's API key"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size with --model")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight with --endpoint")
    shapes = parser.add_argument_group("ShapesWorld benchmark")
    shapes.add_argument("--split", choices=("validation", "test"), default="test")
    shapes.add_argument("--num-images", type=int, help="images to score (default: 500; POPE: every image of its files)")
    shapes.add_argument("--output", type=Path, help="write the report as JSON here")
    shapes.add_argument("--chart", type=Path, help="write a PNG bar chart of the metrics here")
    mmhal = parser.add_argument_group("MMHal-Bench, POPE and CHAIR on real images")
    mmhal.add_argument("--questions", type=Path, help="MMHal-Bench JSON (response_template.json)")
    mmhal.add_argument("--image-dir", type=Path, help="directory with the benchmark's images")
    mmhal.add_argument("--pope-files", help="POPE: question files (JSONL), comma-separated, one per setting")
    mmhal.add_argument("--pope-question-suffix", default="", help="POPE: text appended to each question")
    mmhal.add_argument(
        "--annotations", action="append", type=Path, help="CHAIR: a COCO-style annotation file (repeat for several)"
    )
    mmhal.add_argument("--chair-max-tokens", type=int, default=512, help="CHAIR: description length limit")
    mmhal.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of the judge model")
    mmhal.add_argument("--judge-model", help="the judge's model name")
    mmhal.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with its key")
    mmhal.add_argument("--max-tokens", type=int, default=512, help="answer length limit for MMHal questions")


def _chat_model(args: argparse.Namespace):
    from training.evaluation.models import OpenAIChatModel, TransformersChatModel

    if args.model is not None:
        return TransformersChatModel(args.model, batch_size=args.batch_size)
    if args.endpoint is not None:
        api_key = os.environ.get(args.api_key_env, "EMPTY")
        model = OpenAIChatModel(args.endpoint, args.served_model, api_key=api_key, concurrency=args.concurrency)
        model.check()  # fail with one line before any progress output
        return model
    return None


def _run_shapes(args: argparse.Namespace) -> int:
    from training.evaluation.shapes_bench import evaluate_shapes, format_table, write_chart, write_json
    from training.shapes_world import ShapesWorld

    args.num_images = 500 if args.num_images is None else args.num_images
    if args.num_images <= 0:
        raise ValueError("--num-images must be positive")
    model = _chat_model(args)
    if model is None:
        raise ValueError("give the model to score: --model DIR or --endpoint URL")
    report = evaluate_shapes(model, ShapesWorld(), split=args.split, num_images=args.num_images)
    print(format_table(report))
    if args.output:
        write_json(report, args.output)
    if args.chart:
        write_chart(report, args.chart)
    return 0


def _run_mmhal(args: argparse.Namespace) -> int:
    import json

    from training.evaluation.mmhal import OpenAIJudge, evaluate_mmhal, format_table, load_mmhal

    if not (args.questions and args.image_dir and args.judge_endpoint and args.judge_model):
        raise ValueError("MMHal-Bench needs --questions, --image-dir, --judge-endpoint and --judge-model")
    items = load_mmhal(args.questions, args.image_dir)  # validates the file before anything is loaded
    judge = OpenAIJudge(args.judge_endpoint, args.judge_model, api_key=os.environ.get(args.judge_api_key_env, "EMPTY"))
    judge.check()  # a judge that is down: one line before any answer is asked
    model = _chat_model(args)  # None: judge the file's own model_answer fields
    report = evaluate_mmhal(items, judge, model=model, max_tokens=args.max_tokens)
    print(format_table(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _write(report: dict, path: Path | None) -> None:
    import json

    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def _run_pope(args: argparse.Namespace) -> int:
    from training.evaluation.pope import evaluate_pope, first_images, format_table, load_pope

    if not (args.pope_files and args.image_dir):
        raise ValueError("POPE needs --pope-files and --image-dir")
    files = [Path(name.strip()) for name in args.pope_files.split(",") if name.strip()]
    items = first_images(load_pope(files, args.image_dir), args.num_images or 0)
    model = _chat_model(args)
    if model is None:
        raise ValueError("give the model to score: --model DIR or --endpoint URL")
    report = evaluate_pope(model, items, args.pope_question_suffix)
    print(format_table(report))
    _write({k: v for k, v in report.items() if k != "per_scene"}, args.output)
    return 0


def _run_chair(args: argparse.Namespace) -> int:
    from training.evaluation.chair import evaluate_chair, format_table, load_chair

    if not (args.annotations and args.image_dir):
        raise ValueError("CHAIR needs --annotations and --image-dir")
    items = load_chair(args.annotations, args.image_dir, 500 if args.num_images is None else args.num_images)
    model = _chat_model(args)
    if model is None:
        raise ValueError("give the model to score: --model DIR or --endpoint URL")
    report = evaluate_chair(model, items, max_tokens=args.chair_max_tokens)
    print(format_table(report))
    _write({k: v for k, v in report.items() if k != "per_scene"}, args.output)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    runners = {"mmhal": _run_mmhal, "pope": _run_pope, "chair": _run_chair}
    return runners.get(args.benchmark, _run_shapes)(args)
