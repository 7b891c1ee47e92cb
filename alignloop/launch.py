"""`alignloop serve` and `alignloop up`: settings from the environment and flags, logging, and uvicorn.

alignloop serve                                   # embedded: starts vLLM on the bundled model
alignloop serve --vllm-url http://vllm-0:8000     # external vLLM servers (repeat the flag for several)
alignloop up                                      # the whole service on this machine: demo at /, trainer
alignloop demo --gateway-url http://gateway:8000  # the browser demo alone
"""

from __future__ import annotations

import argparse
import logging

SERVE_FLAGS = {
    "host": "ALIGNLOOP_HOST",
    "port": "ALIGNLOOP_PORT",
    "model": "ALIGNLOOP_MODEL",
    "vllm_urls": "ALIGNLOOP_VLLM_URLS",
    "store_url": "ALIGNLOOP_STORE_URL",
    "adapter_dir": "ALIGNLOOP_ADAPTER_DIR",
    "public_alias": "ALIGNLOOP_PUBLIC_ALIAS",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default 127.0.0.1; $ALIGNLOOP_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000; $ALIGNLOOP_PORT)")
    parser.add_argument("--model", help="base model directory for embedded vLLM (default models/shapes-llava)")
    parser.add_argument(
        "--vllm-url",
        dest="vllm_urls",
        action="append",
        help="an external vLLM OpenAI server; repeat for several (default: start one here)",
    )
    parser.add_argument("--store", dest="store_url", help="store URL (default sqlite:///runs/alignloop.db)")
    parser.add_argument("--adapter-dir", help="directory of adapter versions (default runs/adapters)")
    parser.add_argument("--public-alias", help="the model name clients use (default llava-rlhf)")


def load_settings(args: argparse.Namespace, **fixed):
    """Environment first, flags over it (a bad setting raises pydantic's ValidationError, one line on the CLI)."""
    from serve.settings import GatewaySettings

    overrides = {key: getattr(args, key) for key in SERVE_FLAGS if getattr(args, key, None) is not None}
    return GatewaySettings(**overrides, **fixed)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)


def run_gateway(settings, with_demo: bool = False, helpers: list | None = None) -> int:
    """Runs the gateway until it is stopped; `helpers` (SupervisedProcess) run beside it and stop with it."""
    import uvicorn

    from serve.app import create_app, reserve_api_paths

    configure_logging(settings.log_level)
    app = create_app(settings)
    if with_demo:
        from demo.app import mount_demo
        from demo.settings import DemoSettings

        local_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        demo_settings = DemoSettings(
            gateway_url=f"http://{local_host}:{settings.port}", public_alias=settings.public_alias
        )
        reserve_api_paths(app)
        app = mount_demo(app, demo_settings)
    from alignloop.supervisor import with_helpers

    uvicorn.run(
        with_helpers(app, helpers or []),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    return 0


def serve_command(args: argparse.Namespace) -> int:
    return run_gateway(load_settings(args))


def up_command(args: argparse.Namespace) -> int:
    """The whole service on one machine: the gateway in embedded mode (vLLM on the bundled model), with the demo
    page at `/` on the same port, and the online trainer in a supervised process beside it (its log is
    trainer.log next to the adapter directory)."""
    from alignloop.supervisor import trainer_process

    settings = load_settings(args, vllm_urls=[])
    helpers = [] if args.no_trainer else [trainer_process(settings, settings.adapter_dir.parent / "trainer.log")]
    return run_gateway(settings, with_demo=not args.no_demo, helpers=helpers)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway-url", help="the alignloop gateway (default http://127.0.0.1:8000)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--public-alias", help="the model name the gateway serves (default llava-rlhf)")


def demo_command(args: argparse.Namespace) -> int:
    """`alignloop demo`: the browser demo alone, in front of a gateway that runs elsewhere."""
    from demo.app import run_demo
    from demo.settings import DemoSettings

    overrides = {
        key: getattr(args, key)
        for key in ("gateway_url", "host", "port", "public_alias")
        if getattr(args, key, None) is not None
    }
    settings = DemoSettings(**overrides)
    configure_logging("INFO")
    return run_demo(settings)
