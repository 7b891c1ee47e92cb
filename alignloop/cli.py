"""The `alignloop` command line: one entry point whose subcommands reach every part of the system.

`alignloop --help` imports nothing but the standard library: the command table below is plain text, and a command's
modules are imported only when it runs (or prints its own `--help`). The flags of the commands that run a process
(`up`, `serve`, `demo`, `trainer`, `simulate`, `feedback`) are generated from that process's settings class by
pydantic-settings, so each default and help text is written once, on the field; every flag is also an environment
variable (`alignloop.settings`). Secrets (API keys, the admin key, the salt) are read from the environment only.
The training recipes generate theirs from their config dataclasses.

Expected failures (a missing path, an endpoint that is down, a malformed file, a bad setting) end with one line on
stderr and exit code 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS: dict[str, str] = {
    "up": "the whole service on this machine: the gateway with vLLM, the demo at /, and the online trainer",
    "serve": "the OpenAI-compatible gateway alone (vLLM started here, or --vllm-urls)",
    "demo": "the browser demo alone, in front of a running gateway",
    "trainer": "the online alignment worker: feedback in, gated adapter versions out",
    "simulate": "simulated users against a running gateway: questions, thumbs, corrections",
    "versions": "the adapter versions: status, gate metrics with intervals, decisions and their reasons",
    "feedback": "export feedback events or preference pairs; purge expired records",
    "train": "run a training recipe: sft, reward, ppo or dpo (TRL, on exported feedback pairs)",
    "eval": "score a model on ShapesWorld, POPE, MMHal-Bench or CHAIR, in-process or through an endpoint",
    "data": "export a ShapesWorld split as JSONL+PNG and a datasets dataset",
    "import": "convert a released checkpoint to the served layout: llava-rlhf (model + RLHF LoRA)",
}
LONG_RUNNING = frozenset({"up", "serve", "demo", "trainer", "simulate"})
NOISY_LOGGERS = ("httpx", "httpx2", "httpcore", "openai")
TRAIN_RECIPES: dict[str, str] = {
    "sft": "training.sft",
    "reward": "training.reward_model",
    "ppo": "training.ppo",
    "dpo": "online_rl.dpo_trl",
}
Handler = Callable[[argparse.Namespace], int]


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that come from the user's input or environment, reported as one line. Anything else is a bug.
    (pydantic's ValidationError, a bad setting, is a ValueError.)"""
    import httpx

    return (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ConnectionError,
        TimeoutError,
        ValueError,
        httpx.HTTPError,
    )


def one_line(error: BaseException) -> str:
    """The first line a user needs: for a pydantic settings error, which setting and why."""
    import pydantic

    if isinstance(error, pydantic.ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        return f"bad setting {where}: {first['msg'].removeprefix('Value error, ')}"
    return (str(error) or type(error).__name__).splitlines()[0]


# ---- flags generated from a settings class ------------------------------------------------------------------------
def settings_flags(parser: argparse.ArgumentParser, settings_cls: type) -> Callable[[argparse.Namespace], Any]:
    """Adds a flag for every field of `settings_cls` but its secrets; returns `load(namespace) -> settings`, which
    reads the flags given over the environment and refuses a secret given as a flag."""
    from pydantic_settings import CliSettingsSource
    from pydantic_settings.sources.providers.cli import CLI_SUPPRESS

    from alignloop.settings import SHARED_ENV_PREFIX, SHARED_FIELDS

    source = CliSettingsSource(
        settings_cls,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )
    secrets = [name for name, field in settings_cls.model_fields.items() if CLI_SUPPRESS in field.metadata]
    prefix = settings_cls.env_prefix()
    own = [name for name in settings_cls.model_fields if name not in SHARED_FIELDS | set(secrets)]
    shared = [name.replace("_", "-") for name in settings_cls.model_fields if name in SHARED_FIELDS]
    example = f" (--{own[0].replace('_', '-')}: {prefix}{own[0].upper()})" if own else ""
    parser.epilog = f"Each flag is also read from the environment as {prefix}<NAME>{example}"
    if shared and prefix != SHARED_ENV_PREFIX:
        parser.epilog += f", and the shared ones ({', '.join(shared)}) as {SHARED_ENV_PREFIX}<NAME> too"
    parser.epilog += "; flags win."
    if secrets:
        parser.epilog += f" Secrets only from the environment: {', '.join(prefix + s.upper() for s in secrets)}."

    def load(namespace: argparse.Namespace):
        given = [name for name in secrets if getattr(namespace, name, None) is not None]
        if given:
            raise ValueError(f"{prefix}{given[0].upper()} is a secret: set it in the environment, never as a flag")
        return settings_cls(_cli_settings_source=source(parsed_args=namespace))

    return load


def quiet_progress_bars() -> None:
    """No tqdm bars from transformers' weight loading or training loops in a service's log."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def settings_only(namespace: argparse.Namespace, *extra: str) -> argparse.Namespace:
    """The namespace without the command's own flags, which are not settings."""
    return argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in extra})


# ---- the commands: each adds its flags to its parser and returns its handler --------------------------------------
def _up(parser: argparse.ArgumentParser) -> Handler:
    from serve.settings import GatewaySettings

    parser.add_argument("--no-demo", action="store_true", help="serve the API only, without the demo page at /")
    parser.add_argument("--no-trainer", action="store_true", help="do not run the online trainer beside the gateway")
    load = settings_flags(parser, GatewaySettings)

    def run(args: argparse.Namespace) -> int:
        from alignloop.launch import up

        settings = load(settings_only(args, "no_demo", "no_trainer"))
        return up(settings, with_demo=not args.no_demo, with_trainer=not args.no_trainer)

    return run


def _serve(parser: argparse.ArgumentParser) -> Handler:
    from serve.settings import GatewaySettings

    load = settings_flags(parser, GatewaySettings)

    def run(args: argparse.Namespace) -> int:
        from alignloop.launch import run_gateway

        return run_gateway(load(args))

    return run


def _demo(parser: argparse.ArgumentParser) -> Handler:
    from demo.settings import DemoSettings

    load = settings_flags(parser, DemoSettings)

    def run(args: argparse.Namespace) -> int:
        from alignloop.launch import run_demo_alone

        return run_demo_alone(load(args))

    return run


def _trainer(parser: argparse.ArgumentParser) -> Handler:
    from online_rl.trainer import TrainerSettings

    parser.add_argument("--once", action="store_true", help="run one round as soon as there is a pair, then exit")
    load = settings_flags(parser, TrainerSettings)

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from online_rl.store import open_store
        from online_rl.trainer import OnlineTrainer

        settings = load(settings_only(args, "once"))
        quiet_progress_bars()  # the trainer's log says what it does in phase lines
        if settings.cpus:
            from alignloop.cores import pin_to_cores

            pin_to_cores(settings.cpus)
        if not (Path(settings.model) / "config.json").is_file():
            raise FileNotFoundError(f"no model at {settings.model}: config.json is missing")
        if settings.algorithm == "ppo":
            from training.reward_model import require_reward_model

            require_reward_model(settings.reward_model)
        with open_store(settings.store_url) as store:
            trainer = OnlineTrainer(settings, store)
            if not args.once:
                trainer.run_forever()
                return 0
            if settings.algorithm == "ppo":
                result = trainer.run_ppo_round()
                idle = f"fewer than {settings.ppo_min_prompts} distinct recent prompts with an image; nothing to train"
            else:
                pairs = trainer.poll()
                result = trainer.run_round(pairs) if pairs or trainer.bdhs_candidates else None
                idle = "no preference pairs in the unread feedback; nothing to train"
            if result is None:
                print(idle)
                return 0
            trained_on = "ppo" if settings.algorithm == "ppo" else f"{result.pairs} pairs, {result.events} events"
            print(
                f"policy-v{result.version}: {result.outcome} ({trained_on}, {result.seconds:.0f} s) "
                f"{'; '.join(result.reasons)}"
            )
        return 0

    return run


def _simulate(parser: argparse.ArgumentParser) -> Handler:
    from online_rl.simulator import SimulatorSettings

    parser.add_argument("--output", help="also write the JSON report to this file")
    load = settings_flags(parser, SimulatorSettings)

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from alignloop.client import GatewayClient, GatewayError
        from online_rl.simulator import FeedbackSimulator

        settings = load(settings_only(args, "output"))
        client = GatewayClient(settings.gateway_url, settings.api_key.get_secret_value(), rate_limit_attempts=10)
        try:
            report = FeedbackSimulator(settings, client).run()
        except GatewayError as error:
            raise ConnectionError(str(error)) from None
        finally:
            client.close()
        text = json.dumps(report.to_dict(), indent=2)
        if args.output:
            Path(args.output).write_text(text + "\n")
        print(text)
        return 0

    return run


def _versions(parser: argparse.ArgumentParser) -> Handler:
    from alignloop.settings import ClientSettings

    parser.add_argument("--recent", type=int, default=10, help="how many of the newest versions to show")
    parser.add_argument("--chart", help="also write a PNG chart of CHAIR_s, POPE-adversarial and recall here")
    parser.add_argument("--json", action="store_true", help="print the gateway's answer as JSON instead")
    load = settings_flags(parser, ClientSettings)

    def run(args: argparse.Namespace) -> int:
        import json

        from alignloop.client import GatewayClient, GatewayError
        from demo.actions import metrics_frame, version_summary, versions_table, write_versions_chart

        settings = load(settings_only(args, "recent", "chart", "json"))
        client = GatewayClient(settings.gateway_url, settings.api_key.get_secret_value(), timeout_s=30)
        try:
            overview = client.versions(args.recent)
        except GatewayError as error:
            raise ConnectionError(str(error)) from None
        finally:
            client.close()
        if args.json:
            print(json.dumps(overview, indent=2))
        else:
            print(version_summary(overview).replace("**", "").replace("  \n", "\n"))
            table = versions_table(overview["data"])
            if not table.empty:
                print()
                print(table.to_string(index=False, max_colwidth=90))
        if args.chart:
            write_versions_chart(metrics_frame(overview["data"]), args.chart)
        return 0

    return run


def _feedback(parser: argparse.ArgumentParser) -> Handler:
    from alignloop.settings import StoreSettings
    from online_rl.export import FORMATS, STYLES, WHAT

    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write raw events or preference pairs with their images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("--what", choices=WHAT, default="pairs", help="what to write")
    export.add_argument("--style", choices=STYLES, default="trl", help="pair format (with --what pairs)")
    export.add_argument("--format", choices=FORMATS, default="jsonl", help="file format")
    export.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    purge = actions.add_parser("purge", help="delete generation records older than the store's retention_days")
    loaders = {"export": settings_flags(export, StoreSettings), "purge": settings_flags(purge, StoreSettings)}

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from online_rl.store import open_store

        own = ("action", "what", "style", "format", "output")
        settings = loaders[args.action](settings_only(args, *own))
        url = settings.store_url
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///").split("?")[0]
            if not Path(path).is_file():  # opening would create an empty store: say so instead
                raise FileNotFoundError(f"no store at {path}")
        with open_store(url) as store:
            if args.action == "export":
                from online_rl.export import export_feedback

                summary = export_feedback(store, args.output, what=args.what, style=args.style, fmt=args.format)
            else:
                summary = store.purge_expired()
        print(json.dumps(summary))
        return 0

    return run


def _train(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("recipe", choices=sorted(TRAIN_RECIPES), help="the recipe; its own flags follow its name")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="the recipe's flags (see RECIPE --help)")

    def run(args: argparse.Namespace) -> int:
        recipe = importlib.import_module(TRAIN_RECIPES[args.recipe])
        recipe.main(list(args.recipe_args), prog=f"alignloop train {args.recipe}")
        return 0

    return run


def _eval(parser: argparse.ArgumentParser) -> Handler:
    from training.evaluation.cli import add_eval_arguments, run_eval

    add_eval_arguments(parser)
    return run_eval


def _data(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--split", choices=("train", "validation", "test"), default="test", help="the split")
    parser.add_argument("--num-scenes", type=int, default=500, help="how many scenes")
    parser.add_argument("--start", type=int, default=0, help="index of the first scene")
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--format", default="jsonl,hf", help="comma-separated: jsonl, hf")

    def run(args: argparse.Namespace) -> int:
        from training.data import export_split
        from training.shapes_world import ShapesWorld

        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        path = export_split(ShapesWorld(), args.split, args.num_scenes, args.output, formats, args.start)
        print(f"wrote {args.num_scenes} {args.split} scenes to {path}")
        return 0

    return run


def _import(parser: argparse.ArgumentParser) -> Handler:
    from online_rl.adapters import RegistrySettings

    parser.add_argument("source", choices=("llava-rlhf",), help="what to import: the LLaVA-RLHF release")
    parser.add_argument("--sft-model", required=True, help="the release's sft_model/ (original LLaVA format)")
    parser.add_argument("--lora", required=True, help="the release's rlhf_lora_adapter_model/ (PEFT)")
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--vision-tower", help="a local copy of the CLIP tower the config's mm_vision_tower names (no hub here)"
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="install the LoRA as the next adapter version in --adapter-dir and promote it to --public-alias",
    )
    load = settings_flags(parser, RegistrySettings)
    own = ("source", "sft_model", "lora", "output", "vision_tower", "register")

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from online_rl.adapters import register_adapter_dir
        from online_rl.store import open_store
        from training.import_llava import import_llava_rlhf

        settings = load(settings_only(args, *own))
        store = open_store(settings.store_url) if args.register else None
        try:
            if store is not None:  # refuse before converting: one registry serves one base model
                model_dir = str(Path(args.output).resolve() / "model")
                others = {a.base_model for a in store.list_adapters()} - {model_dir}
                if others:
                    raise ValueError(
                        f"the store at {settings.store_url} holds versions of another base model ({sorted(others)[0]});"
                        " register the import in a new store (--store-url)"
                    )
            result = import_llava_rlhf(args.sft_model, args.lora, args.output, vision_tower=args.vision_tower)
            summary = {"model": str(result.model_dir), "lora": str(result.lora_dir), "lora_rank": result.lora_rank}
            if store is not None:
                notes = json.dumps({"imported": result.provenance}, sort_keys=True)
                record = register_adapter_dir(
                    store, result.lora_dir, settings.adapter_dir, result.model_dir, "llava-rlhf-import", notes=notes
                )
                alias = settings.public_alias
                store.promote(
                    alias,
                    record.version,
                    expected=store.promoted_version(alias),
                    actor="import",
                    reason=f"imported LLaVA-RLHF from {args.lora}",
                )
                summary |= {"registered": record.name, "path": record.path, "promoted": alias}
        finally:
            if store is not None:
                store.close()
        print(json.dumps(summary))
        print(
            f"serve it: alignloop up --model {result.model_dir} --base-model-name {Path(args.output).name} "
            f"--vllm-max-lora-rank {max(16, result.lora_rank or 0)}",
            file=sys.stderr,
        )
        return 0

    return run


BUILDERS: dict[str, Callable[[argparse.ArgumentParser], Handler]] = {
    "up": _up,
    "serve": _serve,
    "demo": _demo,
    "trainer": _trainer,
    "simulate": _simulate,
    "versions": _versions,
    "feedback": _feedback,
    "train": _train,
    "eval": _eval,
    "data": _data,
    "import": _import,
}


def top_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    table = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="alignloop",
        description="Serve an aligned vision-language model and keep aligning it from its users' feedback.",
        epilog=f"commands:\n{table}\n\n`alignloop COMMAND --help` shows a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument(
        "--log-level", help="logging level (default: INFO for the long-running commands, WARNING for the others)"
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    top = top_parser().parse_args(argv)
    parser = argparse.ArgumentParser(
        prog=f"alignloop {top.command}",
        description=COMMANDS[top.command],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    handler = BUILDERS[top.command](parser)
    args = parser.parse_args(top.arguments)
    level = top.log_level or ("INFO" if top.command in LONG_RUNNING else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for chatty in NOISY_LOGGERS:  # a line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return handler(args)
    except user_errors() as error:
        if top.debug:
            raise
        print(f"alignloop {top.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alignloop {top.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
