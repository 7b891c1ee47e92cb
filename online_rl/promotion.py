"""How the trainer and the canary move the alias to a version: through the gateway, or straight in the store.

`Promote` has the signature of `FeedbackStore.promote` (alias, version, expected=, actor=, reason=), and raises the
store's `ConflictError` when the alias does not move. Two implementations:
- `gateway_promoter(url, key)`: `POST /v1/admin/aliases/{alias}/promote` with the service key. The gateway knows the
  vLLM replicas: it loads and smoke-checks the version on every healthy one first, and refuses the move (recorded
  in the alias history with its reason) when one cannot serve it. The actor (trainer, canary) goes into the alias
  history. A canary's version has served users already, and their thumbs chose it: for it, staging checks that
  every replica loads it, not that its answers differ from the base model's. This is the path of a deployed
  trainer.
- the store's own `promote` (`store.promote`): no staging; for a trainer that runs without a gateway (unit tests,
  in-process experiments).
"""

from __future__ import annotations

from typing import Protocol

from alignloop.client import GatewayClient, PromotionConflict
from online_rl.store import ConflictError
from online_rl.store.base import UNSET


class Promote(Protocol):
    def __call__(self, alias: str, version: int | None, expected=UNSET, actor: str = "system", reason: str = ""): ...


def gateway_promoter(gateway_url: str, api_key: str, timeout_s: float = 300.0) -> Promote:
    """Promotes through the gateway (see the module's docstring); the alias must serve `expected` still."""

    def promote(alias: str, version: int | None, expected=UNSET, actor: str = "system", reason: str = ""):
        if expected is UNSET:
            raise ValueError("a promotion through the gateway names the version it expects to replace")
        client = GatewayClient(gateway_url, api_key, timeout_s=timeout_s)
        try:
            return client.promote(alias, version, expected, reason, actor=actor, require_effect=actor != "canary")
        except PromotionConflict as error:
            raise ConflictError(str(error)) from error
        finally:
            client.close()

    return promote
