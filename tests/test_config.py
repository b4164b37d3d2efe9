"""Bad configs give one clear line naming the field and exit code 2, never a traceback."""

from __future__ import annotations

import copy

import pytest

from maskmint import launch
from maskmint.schemas.config import ConfigError, load_config, parse_config


def _run_cli(capsys, config_path, out):
    code = launch.main(["run", "--config", str(config_path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda d: d.update(colour="red"), "colour", "unknown key"),
        (lambda d: d["output"].update(samples="many"), "output.samples", "integer"),
        (lambda d: d["generation"].update(steps=0), "generation.steps", "greater than or equal to 1"),
        (lambda d: d["mask"].update(tau=1.5) if "mask" in d else d.update(mask={"tau": 1.5}), "mask.tau", "less than 1"),
        (lambda d: d["prompts"].update(templates=["a photo of a {place}"]), "templates.0", "no {concept} placeholder"),
        (
            lambda d: d["prompts"]["concepts"][0].update(templates=["a cat on a mat"]),
            "concepts.0.templates.0",
            "concept 'dog' does not occur",
        ),
        (lambda d: d["prompts"].update(templates=["a {concept} in a {city}"]), "templates.0", "['city']"),
        (lambda d: d["model"].update(path="./no/such/model"), "model.path", "does not exist"),
        (lambda d: d["model"].update(path="weights/sd.safetensors"), "model.path", "does not exist"),
        (lambda d: d["generation"].update(height=30), "generation.height", "multiple of 8"),
        (lambda d: d["prompts"]["concepts"][1].update(class_id=1), "prompts", "class_id values must be unique"),
        (lambda d: d["prompts"]["concepts"][0].update(class_id=255), "class_id", "less than or equal to 254"),
        (lambda d: d.update(annotate={"steps_per_call": 0}), "annotate.steps_per_call", "greater than or equal to 1"),
        (lambda d: d.update(capture={"concept_tokens": "first", "concept_text": "caption_phrase"}), "capture",
         "the phrase's first token"),
    ],
)
def test_config_errors_are_one_clear_line(capsys, config_dict, write_config, tmp_path, mutate, field, words):
    data = copy.deepcopy(config_dict)
    mutate(data)
    code, err = _run_cli(capsys, write_config(data), tmp_path / "out")
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert field in err[0] and words in err[0], err[0]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_file_and_bad_yaml(capsys, tmp_path):
    code, err = _run_cli(capsys, tmp_path / "absent.yaml", tmp_path / "out")
    assert code == 2 and "not found" in err[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, err = _run_cli(capsys, bad, tmp_path / "out")
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0]


def test_relative_model_path_resolves_against_config_folder(config_dict, tiny_model_dir, tmp_path):
    config_dir = tiny_model_dir.parent
    data = copy.deepcopy(config_dict)
    data["model"]["path"] = "./" + tiny_model_dir.name
    (config_dir / "c.yaml").write_text(__import__("yaml").safe_dump(data))
    config = load_config(config_dir / "c.yaml")
    assert config.model.path == str(tiny_model_dir.resolve())


def test_hub_id_is_kept_and_defaults_fill_in(config_dict):
    data = copy.deepcopy(config_dict)
    data["model"]["path"] = "some-org/some-model"
    config = parse_config(data)
    assert config.model.path == "some-org/some-model"
    assert config.mask.tau == 0.4 and config.mask.threshold == "fixed"
    assert config.capture.steps is None and config.capture.skip_downscales == [8]


def test_config_hash_changes_with_content(config_dict):
    first = parse_config(config_dict)
    changed = copy.deepcopy(config_dict)
    changed["output"]["samples"] += 1
    assert first.config_hash() == parse_config(copy.deepcopy(config_dict)).config_hash()
    assert first.config_hash() != parse_config(changed).config_hash()


def test_parse_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["not", "a", "mapping"])


def test_readme_defaults_are_the_schema_defaults(config_dict):
    """Every default the README's config table states as a literal is the one the schema applies."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    minimal = {"model": {"path": "org/model"}, "prompts": {"concepts": [{"name": "dog", "class_id": 1}]}}
    defaults = parse_config(minimal).model_dump()
    checked = 0
    for row in re.findall(r"^\| `(\w+)` \|.*\| (.*) \|$", readme, flags=re.MULTILINE):
        section, fields = row
        for name, stated in re.findall(r"`(\w+)` \(([^)]+)\)", fields):
            value = stated.split(";")[0].split(":")[0].strip()
            actual = defaults[section].get(name, "absent")
            if re.fullmatch(r"-?[\d.]+", value):
                assert actual == float(value), (section, name, stated, actual)
            elif value in ("true", "false"):
                assert actual is (value == "true"), (section, name, stated, actual)
            elif value == "none":
                assert actual is None, (section, name, stated, actual)
            elif value in ("jpg", "ray", "auto"):
                assert actual == value, (section, name, stated, actual)
            else:
                continue
            checked += 1
    assert checked >= 30
