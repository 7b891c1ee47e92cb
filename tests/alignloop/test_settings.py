"""One settings mechanism: shared fields under ALIGNLOOP_, each process's own prefix, flags made from the fields."""

import argparse
import subprocess
import sys

import pytest
from pydantic import ValidationError

from alignloop.cli import one_line, settings_flags, settings_only
from alignloop.settings import DEFAULT_STORE_URL, StoreSettings
from demo.settings import DemoSettings
from online_rl.simulator import SimulatorSettings
from online_rl.trainer import TrainerSettings
from serve.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("ALIGNLOOP_"):
            monkeypatch.delenv(name)


def test_one_store_url_reaches_every_process(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_STORE_URL", "redis://store:6379/0")
    monkeypatch.setenv("ALIGNLOOP_PUBLIC_ALIAS", "our-model")
    assert GatewaySettings().store_url == TrainerSettings().store_url == StoreSettings().store_url
    assert TrainerSettings().store_url == "redis://store:6379/0"
    aliases = {GatewaySettings().public_alias, TrainerSettings().public_alias, DemoSettings().public_alias}
    assert aliases == {"our-model"}
    assert SimulatorSettings().public_alias == "our-model"


def test_a_process_prefix_overrides_the_shared_one_and_flags_override_both(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_STORE_URL", "sqlite:///shared.db")
    monkeypatch.setenv("ALIGNLOOP_TRAINER_STORE_URL", "sqlite:///trainer.db")
    assert TrainerSettings().store_url == "sqlite:///trainer.db"
    assert GatewaySettings().store_url == "sqlite:///shared.db"
    parser = argparse.ArgumentParser()
    load = settings_flags(parser, TrainerSettings)
    assert load(parser.parse_args(["--store-url", "sqlite:///flag.db"])).store_url == "sqlite:///flag.db"


def test_a_process_reads_its_own_fields_only_under_its_own_prefix(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_ROUND_MIN_PAIRS", "3")  # not the trainer's prefix
    monkeypatch.setenv("ALIGNLOOP_DEMO_PORT", "9000")
    assert TrainerSettings().round_min_pairs == 16
    assert DemoSettings().port == 9000 and GatewaySettings().port == 8000


def test_defaults_are_written_once():
    assert GatewaySettings().store_url == TrainerSettings().store_url == StoreSettings().store_url == DEFAULT_STORE_URL
    assert GatewaySettings().model == TrainerSettings().model
    assert GatewaySettings().adapter_dir == TrainerSettings().adapter_dir


def test_flags_are_generated_from_the_fields_in_kebab_case():
    parser = argparse.ArgumentParser()
    load = settings_flags(parser, TrainerSettings)
    settings = load(
        parser.parse_args(["--pair-sources", "correction,bdhs", "--round-min-pairs", "4", "--no-dense-normalize"])
    )
    assert settings.pair_sources == frozenset({"correction", "bdhs"})
    assert (settings.round_min_pairs, settings.dense_normalize) == (4, False)
    gateway_parser = argparse.ArgumentParser()
    gateway = settings_flags(gateway_parser, GatewaySettings)(
        gateway_parser.parse_args(["--vllm-urls", "http://a:8000/v1,http://b:8000/"])
    )
    assert gateway.vllm_urls == ["http://a:8000", "http://b:8000"]
    assert "--rate-limit-per-minute" in gateway_parser.format_help()


def test_an_environment_list_is_comma_separated(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_TRAINER_PAIR_SOURCES", "thumbs, preference")
    assert TrainerSettings().pair_sources == frozenset({"thumbs", "preference"})


def test_secrets_are_never_flags(monkeypatch):
    parser = argparse.ArgumentParser()
    load = settings_flags(parser, GatewaySettings)
    assert "--admin-key" not in parser.format_help() and "ALIGNLOOP_ADMIN_KEY" in parser.format_help()
    with pytest.raises(ValueError, match="ALIGNLOOP_ADMIN_KEY is a secret: set it in the environment"):
        load(parser.parse_args(["--admin-key", "0123456789abcdef0123"]))
    monkeypatch.setenv("ALIGNLOOP_ADMIN_KEY", "0123456789abcdef0123")
    assert load(parser.parse_args([])).admin_key.get_secret_value() == "0123456789abcdef0123"


def test_a_bad_flag_value_is_one_line_naming_the_setting():
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true")
    load = settings_flags(parser, TrainerSettings)
    with pytest.raises(ValidationError) as raised:
        load(settings_only(parser.parse_args(["--once", "--online-share", "2"]), "once"))
    assert one_line(raised.value) == "bad setting online_share: Input should be less than or equal to 1"


def test_help_imports_nothing_but_the_standard_library():
    """`alignloop --help` lists the commands without importing any command's modules (or pydantic, or httpx)."""
    code = (
        "import sys\n"
        "from alignloop.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_settings', 'httpx', 'torch',"
        " 'serve', 'online_rl', 'training', 'demo', 'openai'})\n"
        "print('IMPORTED', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "IMPORTED []" in result.stdout, result.stdout + result.stderr
    assert all(name in result.stdout for name in ("up", "serve", "demo", "trainer", "simulate", "feedback", "train"))
