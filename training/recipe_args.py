"""The training recipes' command lines, generated from their config dataclasses by transformers' HfArgumentParser.

Flags are shown in kebab case (`--output-dir`), the style of every `alignloop` command; the snake-case spellings
HfArgumentParser also registers (`--output_dir`) keep working but are not listed.
"""

from __future__ import annotations

import argparse


def recipe_parser(config_cls: type, prog: str | None, description: str):
    """An HfArgumentParser for `config_cls` whose help lists each flag once, in kebab case, with its default."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog, description=description)
    for action in parser._actions:
        kebab = [option for option in action.option_strings if "_" not in option]
        if kebab:
            action.option_strings = kebab  # parsing still knows every spelling (parser._option_string_actions)
        elif action.option_strings and action.help is not None:
            action.help = argparse.SUPPRESS  # a snake-case-only alias (e.g. --no_with_facts) of a listed flag
    return parser
