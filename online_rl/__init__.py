"""Online alignment: the feedback store, pair builders, trainer worker, eval gate and adapter registry."""
