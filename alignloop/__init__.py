"""alignloop's composition root: the only package that knows every part and wires them into processes.

`alignloop.cli` is the `alignloop` command line, with flags generated from each process's settings class;
`alignloop.launch` runs `serve`, `up` and `demo` (uvicorn with the gateway, the demo mounted at `/`, the online
trainer beside it); `alignloop.supervisor` keeps the trainer process alive; `alignloop.settings` holds the settings
every process shares. At the bottom of the layers, `alignloop.client` is the one client of the HTTP API: the demo,
the simulated users, evaluation through an endpoint, the trainer's gate and an external judge all reach the service
through it, and it imports nothing else of alignloop. docs/architecture.md describes the layers.
"""
