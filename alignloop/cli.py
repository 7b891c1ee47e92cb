"""The `alignloop` command line: one entry point whose subcommands reach every part of the system.

    alignloop data   --split test --num-scenes 500 --output data/shapes-test   export ShapesWorld
    alignloop train sft [--steps N ...]                                       run a training recipe
    alignloop eval   --model models/shapes-llava                              score a model in-process
    alignloop eval   --endpoint http://host:8000/v1 --served-model NAME       score any OpenAI endpoint
    alignloop eval   --benchmark mmhal --questions F --image-dir D ...        MMHal-Bench with a judge
    alignloop feedback export --what pairs --style trl --output DIR           export feedback for training
    alignloop serve  [--vllm-url URL ...]                                     the OpenAI-compatible gateway
    alignloop up                                                              the whole service, embedded
    alignloop demo   --gateway-url http://127.0.0.1:8000                      the browser demo alone
    alignloop trainer [--once]                                                the online alignment worker

Subcommand modules are imported when their command runs, so `alignloop --help` is instant. Expected failures
(a missing path, an endpoint that is down, a malformed file) end with one line on stderr and a non-zero exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import httpx

# Errors that come from the user's input or environment, reported as one line. Anything else is a bug: traceback.
# (pydantic's ValidationError, a bad setting, is a ValueError.)
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    ConnectionError,
    TimeoutError,
    ValueError,
    httpx.HTTPError,
)
TRAIN_RECIPES: dict[str, str] = {"sft": "training.sft", "reward": "training.reward_model", "ppo": "training.ppo"}


def _data(args: argparse.Namespace) -> int:
    from training.data import export_split
    from training.shapes_world import ShapesWorld

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    path = export_split(ShapesWorld(), args.split, args.num_scenes, args.output, formats, args.start)
    print(f"wrote {args.num_scenes} {args.split} scenes to {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import importlib

    recipe = importlib.import_module(TRAIN_RECIPES[args.recipe])
    recipe.main(list(args.recipe_args), prog=f"alignloop train {args.recipe}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluation.cli import run_eval

    return run_eval(args)


def _feedback(args: argparse.Namespace) -> int:
    from online_rl.cli import run_feedback

    return run_feedback(args)


def _serve(args: argparse.Namespace) -> int:
    from alignloop.launch import serve_command

    return serve_command(args)


def _demo(args: argparse.Namespace) -> int:
    from alignloop.launch import demo_command

    return demo_command(args)


def _trainer(args: argparse.Namespace) -> int:
    from online_rl.trainer import trainer_command

    return trainer_command(args)


def _simulate(args: argparse.Namespace) -> int:
    from online_rl.simulator import simulate_command

    return simulate_command(args)


def _up(args: argparse.Namespace) -> int:
    from alignloop.launch import up_command

    return up_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignloop", description="Serve an aligned VLM and align it from feedback.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--log-level", default="WARNING", help="logging level for library messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="export a ShapesWorld split as JSONL+PNG and a datasets dataset")
    data.add_argument("--split", choices=("train", "validation", "test"), default="test")
    data.add_argument("--num-scenes", type=int, default=500)
    data.add_argument("--start", type=int, default=0, help="index of the first scene")
    data.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    data.add_argument("--format", default="jsonl,hf", help="comma-separated: jsonl, hf")
    data.set_defaults(handler=_data)

    train = commands.add_parser("train", help="run a training recipe (arguments after the recipe name go to it)")
    train.add_argument("recipe", choices=sorted(TRAIN_RECIPES))
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="the recipe's own flags; see --help after it")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="score a model on ShapesWorld or MMHal-Bench")
    from training.evaluation.cli import add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    feedback = commands.add_parser("feedback", help="export feedback events or preference pairs; purge old records")
    from online_rl.cli import add_feedback_arguments

    add_feedback_arguments(feedback)
    feedback.set_defaults(handler=_feedback)

    from alignloop.launch import add_serve_arguments

    serve = commands.add_parser("serve", help="run the OpenAI-compatible gateway (embedded vLLM or --vllm-url)")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    up = commands.add_parser("up", help="run the whole service on this machine on the bundled model")
    add_serve_arguments(up)
    up.add_argument("--no-demo", action="store_true", help="serve the API only, without the demo page at /")
    up.add_argument("--no-trainer", action="store_true", help="do not run the online trainer beside the gateway")
    up.set_defaults(handler=_up)

    trainer = commands.add_parser("trainer", help="run the online alignment worker: feedback in, gated versions out")
    from online_rl.trainer import add_trainer_arguments

    add_trainer_arguments(trainer)
    trainer.set_defaults(handler=_trainer)

    simulate = commands.add_parser(
        "simulate", help="play simulated users against the gateway: questions, thumbs, corrections"
    )
    from online_rl.simulator import add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(handler=_simulate)

    from alignloop.launch import add_demo_arguments

    demo = commands.add_parser("demo", help="run the browser demo in front of a running gateway")
    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo)
    return parser


def one_line(error: BaseException) -> str:
    """The first line a user needs: for a pydantic settings error, which setting and why."""
    import pydantic

    if isinstance(error, pydantic.ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        return f"bad setting {where}: {first['msg'].removeprefix('Value error, ')}"
    return (str(error) or type(error).__name__).splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"alignloop {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alignloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
