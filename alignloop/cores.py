"""CPU cores for processes that share one machine: vLLM's CPU engine and the trainer beside it under `alignloop up`.

vLLM's CPU engine binds one busy-polling OpenMP thread to each of its cores; a torch process whose threads land on
those cores waits on them (one DPO step of the bundled model took 94 s there, against 2.5 s on a core of its own).
So `up` gives them disjoint cores, and each process runs as many threads as it has cores.
"""

from __future__ import annotations

import os


def parse_cores(text: str) -> list[int]:
    """The cores a list such as "0-3,6" names, sorted, each once (the syntax of taskset and vLLM's binding)."""
    cores: set[int] = set()
    for part in (item.strip() for item in text.split(",")):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"not a core list: {text!r} (expected e.g. 0-3,6)")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"not a core list: {text!r} ({part} runs backwards)")
        cores.update(range(first, last + 1))
    return sorted(cores)


def checked_cores(text: str | None) -> str | None:
    """A core-list setting, unchanged once it parses (pydantic's AfterValidator for `cpus` settings)."""
    if text is not None:
        parse_cores(text)
    return text


def format_cores(cores: list[int]) -> str:
    """The shortest list of ranges for `cores`: [0, 1, 2, 5] -> "0-2,5"."""
    ranges: list[list[int]] = []
    for core in sorted(set(cores)):
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def split_for_vllm_and_trainer(
    available: list[int], vllm: str | None = None, trainer: str | None = None
) -> tuple[str | None, str | None]:
    """The cores of vLLM's CPU engine and of the trainer when they share `available`. Given ones are kept and the
    other gets the cores they leave; with neither given, the first half (rounded up) goes to vLLM and the rest to
    the trainer. None where nothing is left to give (a single core)."""
    cores = sorted(available)
    if vllm and trainer:
        return vllm, trainer
    if vllm or trainer:
        rest = [core for core in cores if core not in parse_cores(vllm or trainer)]
        other = format_cores(rest) if rest else None
        return (vllm, other) if vllm else (other, trainer)
    if len(cores) < 2:
        return None, None
    middle = (len(cores) + 1) // 2
    return format_cores(cores[:middle]), format_cores(cores[middle:])


def pin_to_cores(text: str) -> list[int]:
    """Runs this process on the cores `text` names, with as many torch threads. Returns the cores."""
    import torch

    cores = parse_cores(text)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores
