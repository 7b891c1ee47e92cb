"""Online alignment: the feedback store (SQLite or Redis), preference pairs built from feedback (corrections, thumbs,
preferences, BDHS, judged online samples from logged prompts), the DPO step, the trainer worker and its eval gate,
adapter publishing and the registry, feedback export, and the simulated users, which reach the gateway over HTTP
only. `alignloop trainer`, `alignloop simulate` and `alignloop feedback` run it.
"""
