"""Keeps a helper process alive beside the gateway: `alignloop up` runs the online trainer this way.

`SupervisedProcess` starts a command, restarts it when it exits (after a back-off that doubles up to `max_backoff_s`
while it keeps failing fast, and resets once it has run for `stable_after_s`), and stops it on shutdown with SIGTERM,
then SIGKILL after a grace period. Its output goes to a log file, so the gateway's own log stays readable. On Linux
the child also gets SIGTERM when its supervisor dies (even by SIGKILL), so no trainer outlives its gateway.

`with_helpers(app, helpers)` ties helpers to an ASGI app's lifespan: they start with the server and are stopped
during its graceful shutdown, before uvicorn re-raises the signal that stopped it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the thread that started it goes away."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SupervisedProcess:
    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        log_path: str | Path,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_after_s: float = 60.0,
    ):
        self.name = name
        self.command = list(command)
        self.env = env
        self.log_path = Path(log_path)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"supervise-{name}", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> SupervisedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        log = self.log_path.open("ab")
        try:
            return subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 (prctl only)
            )
        finally:
            log.close()  # the child holds its own copy of the descriptor

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while not self._stopping.is_set():
            started = time.monotonic()
            self._process = self._spawn()
            logger.info("%s started pid=%d log=%s", self.name, self._process.pid, self.log_path)
            code = self._process.wait()
            if self._stopping.is_set():
                return
            ran_for = time.monotonic() - started
            backoff = self.min_backoff_s if ran_for >= self.stable_after_s else min(backoff * 2, self.max_backoff_s)
            self.restarts += 1
            logger.warning(
                "%s exited with code %s after %.0f s; restarting in %.0f s (see %s)",
                self.name,
                code,
                ran_for,
                backoff,
                self.log_path,
            )
            self._stopping.wait(backoff)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """Stops the process (and its restarts); returns its exit code, or None when it was not running."""
        self._stopping.set()
        process = self._process
        if process is None or process.poll() is not None:
            self._thread.join(timeout=1)
            return process.returncode if process else None
        process.terminate()
        try:
            code = process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, grace_s)
            process.kill()
            code = process.wait()
        self._thread.join(timeout=5)
        return code


def with_helpers(app, helpers: list[SupervisedProcess]):
    """The ASGI app, with `helpers` started at lifespan startup and stopped at lifespan shutdown."""
    if not helpers:
        return app

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def lifespan_receive():
            import anyio

            message = await receive()
            if message["type"] == "lifespan.startup":
                for helper in helpers:
                    helper.start()
            elif message["type"] == "lifespan.shutdown":
                for helper in helpers:
                    await anyio.to_thread.run_sync(helper.stop)
            return message

        return await app(scope, lifespan_receive, send)

    return wrapped


def trainer_process(settings, log_path: str | Path = "runs/trainer.log", cpus: str | None = None) -> SupervisedProcess:
    """The online trainer for a gateway with these settings: same store, model and adapter directory, gating through
    this gateway on its local address with the gateway's service key; on `cpus` when given."""
    env = {
        **os.environ,
        "ALIGNLOOP_TRAINER_STORE_URL": settings.store_url,
        "ALIGNLOOP_TRAINER_MODEL": settings.model,
        "ALIGNLOOP_TRAINER_ADAPTER_DIR": str(settings.adapter_dir),
        "ALIGNLOOP_TRAINER_GATEWAY_URL": settings.local_url,
        "ALIGNLOOP_TRAINER_PUBLIC_ALIAS": settings.public_alias,
    }
    if settings.service_key is not None:  # the gateway knows it as its own service, apart from users
        env["ALIGNLOOP_TRAINER_API_KEY"] = settings.service_key.get_secret_value()
    if cpus:
        env["ALIGNLOOP_TRAINER_CPUS"] = cpus
    command = [sys.executable, "-m", "alignloop.cli", "trainer"]
    return SupervisedProcess("trainer", command, env, log_path)
