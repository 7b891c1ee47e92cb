"""What `alignloop serve`, `up` and `demo` run: uvicorn with the gateway, the demo page and the trainer beside it.

alignloop serve                                     # the gateway; vLLM started here on the bundled model
alignloop serve --vllm-urls http://vllm-0:8000      # the gateway in front of vLLM servers run elsewhere
alignloop up                                        # the whole service on this machine: demo at /, trainer
alignloop demo --gateway-url http://gateway:8000    # the browser demo alone
"""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    for chatty in ("httpx", "httpx2", "httpcore", "openai"):  # a line per health check and upstream call otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)


def run_gateway(settings, with_demo: bool = False, helpers: list | None = None) -> int:
    """Runs the gateway until it is stopped; `helpers` (SupervisedProcess) run beside it and stop with it."""
    import uvicorn

    from serve.app import create_app, reserve_api_paths

    configure_logging(settings.log_level)
    app = create_app(settings)
    if with_demo:
        from demo.app import mount_demo
        from demo.settings import DemoSettings

        demo_settings = DemoSettings(gateway_url=settings.local_url, public_alias=settings.public_alias)
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


def up(settings, with_demo: bool = True, with_trainer: bool = True) -> int:
    """The whole service on one machine: the gateway with vLLM started beside it (any `vllm_urls` are ignored), the
    demo page at `/` on the same port, and the online trainer in a supervised process (its log is trainer.log next
    to the adapter directory), which gates versions with a service key generated for the run unless
    ALIGNLOOP_SERVICE_KEY gives one."""
    import secrets

    from pydantic import SecretStr

    from alignloop.supervisor import trainer_process

    update: dict = {"vllm_urls": []}
    if settings.service_key is None:  # the trainer's own identity, for this run
        update["service_key"] = SecretStr(secrets.token_urlsafe(32))
    trainer_cpus = None
    if with_trainer:
        vllm_cpus, trainer_cpus = colocated_cores(settings.vllm_cpus)
        update["vllm_cpus"] = vllm_cpus
    settings = settings.model_copy(update=update)
    helpers = (
        [trainer_process(settings, settings.adapter_dir.parent / "trainer.log", trainer_cpus)] if with_trainer else []
    )
    return run_gateway(settings, with_demo=with_demo, helpers=helpers)


def colocated_cores(vllm_cpus: str | None) -> tuple[str | None, str | None]:
    """The cores of vLLM's engine and of the trainer under `up`. Given ones are kept (ALIGNLOOP_TRAINER_CPUS is read
    by the trainer itself); on a machine without a CUDA GPU, the others split this process's cores between them."""
    import os

    import torch

    from alignloop.cores import split_for_vllm_and_trainer

    trainer_cpus = os.environ.get("ALIGNLOOP_TRAINER_CPUS") or None
    if torch.cuda.is_available():
        return vllm_cpus, trainer_cpus
    vllm_cpus, trainer_cpus = split_for_vllm_and_trainer(sorted(os.sched_getaffinity(0)), vllm_cpus, trainer_cpus)
    logging.getLogger(__name__).info("cores vllm_engine=%s trainer=%s", vllm_cpus or "all", trainer_cpus or "all")
    return vllm_cpus, trainer_cpus


def run_demo_alone(settings) -> int:
    """The browser demo alone, in front of the gateway at `settings.gateway_url`."""
    from demo.app import run_demo

    configure_logging("INFO")
    return run_demo(settings)
