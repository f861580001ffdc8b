"""A model folder's recommended settings (generation_defaults.json): requests that leave a field unset get the
model's value, a field the caller sets wins, and a bad file is refused when the model loads."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import dapple
from dapple.errors import ModelLoadError
from dapple.interfaces.cli import app
from dapple.request import make_request
from dapple.service.outputs import read_infotext

RECOMMENDED = {"sampler": "DPM++ 2M", "steps": 3, "guidance_scale": 5.0, "guidance_min_timestep": 600}


@pytest.fixture
def recommending_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "recommending"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_defaults.json").write_text(json.dumps(RECOMMENDED))
    return folder


def test_unset_fields_take_the_models_recommendation(recommending_model) -> None:
    pipe = dapple.load(recommending_model, device="cpu")
    assert pipe.components.generation_defaults == RECOMMENDED
    info = pipe.generate("a red circle", seed=1).infotexts[0]
    assert "Steps: 3, Sampler: DPM++ 2M, CFG scale: 5, CFG min timestep: 600" in info
    chosen = pipe.generate("a red circle", seed=1, sampler="Euler", guidance_scale=7.0,
                           guidance_min_timestep=0).infotexts[0]
    assert "Steps: 3, Sampler: Euler, CFG scale: 7, Seed" in chosen  # the caller's values win, 0 included
    # A request built elsewhere (the CLI, the job API) counts only the fields it was given as set.
    explicit = pipe.run(make_request(prompt="a red circle", seed=1, guidance_scale=7.0)).infotexts[0]
    assert "Sampler: DPM++ 2M, CFG scale: 7, CFG min timestep: 600" in explicit


def test_a_folder_without_the_file_keeps_dapples_defaults(pipe) -> None:
    assert pipe.components.generation_defaults == {}
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7" in pipe.generate("x", steps=1, seed=1).infotexts[0]


@pytest.mark.parametrize(("content", "message"), [
    ({"prompt": "a cat"}, "cannot recommend prompt; allowed: sampler, steps, guidance_scale, guidance_min_timestep"),
    ({"guidance_scale": 99}, "guidance_scale=99 is invalid"),
    ({"sampler": "Euler b"}, "unknown sampler 'Euler b'"),
    ("not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
])
def test_a_bad_recommendation_is_refused_when_the_model_loads(recommending_model, content, message) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (recommending_model / "generation_defaults.json").write_text(text)
    with pytest.raises(ModelLoadError, match="generation_defaults.json") as error:
        dapple.load(recommending_model, device="cpu")
    assert message in str(error.value)


def test_the_command_line_says_which_recommended_settings_it_used(recommending_model, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(recommending_model), "--seed", "2",
                                 "--cfg", "6", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "the model's recommended settings: sampler=DPM++ 2M, steps=3, guidance_min_timestep=600" in result.stderr
    info = read_infotext(result.stdout.strip().splitlines()[-1])
    assert "Steps: 3, Sampler: DPM++ 2M, CFG scale: 6, CFG min timestep: 600" in info
