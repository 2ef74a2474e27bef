"""`load_model`'s errors for names and folders it cannot load: one line, no hub retries."""

import pytest

import eetools as ee
from eetools.io.models import ModelNotFoundError


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name_is_a_clear_error(name):
    with pytest.raises(ModelNotFoundError, match="model name is empty"):
        ee.load_model(name)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        ee.load_model(tmp_path)


def test_unresolvable_hub_name_fails_in_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        ee.load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "\n" not in msg and "no-such-org/no-such-model" in msg and "cache" in msg


@pytest.mark.parametrize("path", ["/no/such/folder", "./missing-model", "runs/x/model"])
def test_missing_local_folder_is_not_sent_to_the_hub(path):
    with pytest.raises(ModelNotFoundError, match="no model folder at"):
        ee.load_model(path)
