import os

import pytest

from alignloop.cores import format_cores, parse_cores, pin_to_cores, split_for_vllm_and_trainer


def test_core_lists_parse_and_format_as_taskset_writes_them():
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cores("5, 1,1") == [1, 5]
    assert format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_cores([3]) == "3"


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "-2"])
def test_a_bad_core_list_is_one_clear_error(text):
    with pytest.raises(ValueError, match="not a core list"):
        parse_cores(text)


def test_vllm_gets_the_first_half_and_the_trainer_the_rest():
    assert split_for_vllm_and_trainer([0, 1]) == ("0", "1")
    assert split_for_vllm_and_trainer([0, 1, 2]) == ("0-1", "2")
    assert split_for_vllm_and_trainer(list(range(16))) == ("0-7", "8-15")
    assert split_for_vllm_and_trainer([2, 3, 6, 7]) == ("2-3", "6-7")
    assert split_for_vllm_and_trainer([0]) == (None, None)


def test_given_cores_are_kept_and_the_other_process_gets_the_rest():
    assert split_for_vllm_and_trainer([0, 1, 2, 3], vllm="0-2") == ("0-2", "3")
    assert split_for_vllm_and_trainer([0, 1, 2, 3], trainer="0") == ("1-3", "0")
    assert split_for_vllm_and_trainer([0, 1], vllm="0-1") == ("0-1", None)
    assert split_for_vllm_and_trainer([0, 1], vllm="1", trainer="1") == ("1", "1")


def test_pinning_sets_the_affinity_and_the_torch_threads():
    import torch

    before_affinity, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    core = min(before_affinity)
    try:
        assert pin_to_cores(str(core)) == [core]
        assert os.sched_getaffinity(0) == {core}
        assert torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, before_affinity)
        torch.set_num_threads(before_threads)


def test_core_settings_are_checked_when_read():
    from pydantic import ValidationError

    from online_rl.trainer import TrainerSettings
    from serve.settings import GatewaySettings

    assert TrainerSettings(cpus="1").cpus == "1" and GatewaySettings(vllm_cpus="0-3").vllm_cpus == "0-3"
    with pytest.raises(ValidationError, match="not a core list"):
        TrainerSettings(cpus="one")
    with pytest.raises(ValidationError, match="not a core list"):
        GatewaySettings(vllm_cpus="3-1")
