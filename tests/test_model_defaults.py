"""A model folder's own sampling settings (latentdiff.json): read, resolved against a call's, written back."""
import json
from pathlib import Path

import pytest

import latentdiff
from latentdiff.errors import ModelError
from latentdiff.model_defaults import FILE, ModelDefaults


def test_a_call_s_settings_win_and_unset_ones_are_the_model_s():
    own = ModelDefaults(0.9, True)
    assert own.resolve(None, None) == (0.9, True)
    assert own.resolve(0.0, None) == (0.0, True) and own.resolve(None, False) == (0.9, False)
    assert own.resolve(2, True) == (2.0, True) and isinstance(own.resolve(2, True)[0], float)
    assert ModelDefaults().resolve(None, None) == (0.0, False)  # no file: A1111's default, off


@pytest.mark.parametrize("min_sigma, all_steps, says", [
    (-0.1, False, "guidance_min_sigma must be a number ≥ 0"), (float("inf"), False, "guidance_min_sigma must be"),
    (True, False, "guidance_min_sigma must be"), ("1", False, "guidance_min_sigma must be"),
    (1.0, 1, "guidance_min_sigma_all_steps must be true or false")])
def test_bad_values_are_one_sentence(min_sigma, all_steps, says):
    with pytest.raises(ValueError, match=says):
        ModelDefaults().resolve(min_sigma, all_steps)
    with pytest.raises(ValueError, match=says):
        ModelDefaults(min_sigma, all_steps)


def test_written_only_when_it_says_something_and_read_back(tmp_path):
    ModelDefaults().write(tmp_path)
    assert not (tmp_path / FILE).exists() and ModelDefaults.read(tmp_path) == ModelDefaults()
    ModelDefaults(0.0, True).write(tmp_path)
    assert json.loads((tmp_path / FILE).read_text()) == {"guidance_min_sigma": 0.0, "guidance_min_sigma_all_steps": True}
    ModelDefaults(0.5, False).write(tmp_path)
    assert ModelDefaults.read(tmp_path) == ModelDefaults(0.5, False)
    (tmp_path / FILE).write_text('{"guidance_min_sigma": 0.25}')  # a key left out keeps its default
    assert ModelDefaults.read(tmp_path) == ModelDefaults(0.25, False)


@pytest.mark.parametrize("content, named", [("{", "Expecting property name"), ('{"ngms": 1}', "unexpected keyword"),
                                            ('{"guidance_min_sigma": -1}', "must be a number ≥ 0"),
                                            ("[1]", "argument after \\*\\* must be a mapping")])
def test_a_bad_file_is_one_sentence_naming_it(tmp_path, content, named):
    (tmp_path / FILE).write_text(content)
    with pytest.raises(ModelError, match=f"{FILE} is not a latentdiff model-defaults file \\(.*{named}.*\\); expected a "
                                         "JSON object with guidance_min_sigma"):
        ModelDefaults.read(tmp_path)


def test_the_shipped_models_file_is_what_write_produces(tmp_path):
    """scripts/train_default_model.sh writes latentdiff/default_model/latentdiff.json through save_pretrained; rerunning
    it must leave the packaged file byte for byte as committed (two-space JSON, one key per line, a final newline)."""
    shipped = Path(latentdiff.__file__).parent / "default_model" / FILE
    ModelDefaults.read(shipped.parent).write(tmp_path)
    assert (tmp_path / FILE).read_text() == shipped.read_text()
