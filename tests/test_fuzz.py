"""Property-based: whatever a user writes in a config or on the command line, maskmint
answers with exit 0, or exit 2 and one line naming what is wrong, never a traceback.

MASKMINT_FUZZ_EXAMPLES sets how many configs are tried (CI: the default below)."""

from __future__ import annotations

import copy
import math
from collections import Counter
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskmint import launch
from tests.conftest import BASE_CONFIG

EXAMPLES = int(os.environ.get("MASKMINT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["{concept}", "{concept} {x}", "a {concept} and {concept}", "{", "}", "{0}", "{concept!r}",
                     "auto", "cpu", "cuda:7", "jpg", "png", "otsu", "ray", "local", "", " ", "../x", "/dev/null"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def paths(node, prefix=()):
    """Every key path in a nested config (lists by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def parent_of(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated_configs(draw, base: dict):
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        every = list(paths(data))
        if not every:
            break
        path = draw(st.sampled_from(every))
        parent = parent_of(data, path)
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return data


def dumps(data) -> str | None:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return None


def one_clear_line(capsys, code: int) -> int:
    captured = capsys.readouterr()
    assert code in (0, 2), (code, captured.err)
    assert "Traceback" not in captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: x"), lines
    return code


@pytest.fixture(scope="module")
def base_config(tiny_model_dir) -> dict:
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(tiny_model_dir)
    return data


def test_fuzzed_configs_plan_or_fail_in_one_line(base_config, capsys):
    outcomes = Counter()

    @FUZZ
    @given(data=mutated_configs(base_config))
    def check(data):
        text = dumps(data)
        if text is None:
            return
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "c.yaml"
            path.write_text(text)
            outcomes[one_clear_line(capsys, launch.main(["plan", "--config", str(path), "--json"]))] += 1

    check()
    with capsys.disabled():
        print(f"\nfuzzed configs: {sum(outcomes.values())} ({outcomes[0]} valid, {outcomes[2]} refused in one line)")
    assert outcomes[0] > 0 and outcomes[2] > 0  # both sides of the line were reached


@pytest.mark.parametrize("text", ["", "null", "- a\n- b", "42", "model: {path: x}", "\x00", ":\n  - ]", "a: !!python/object:os.system x"])
def test_config_files_that_are_not_configs(text, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    one_clear_line(capsys, launch.main(["plan", "--config", str(path)]))


@pytest.fixture(scope="module")
def cli_world(base_config, tmp_path_factory):
    """Things a user may point the CLI at: a whole small run, a config, a file, a folder."""
    root = tmp_path_factory.mktemp("cli")
    small = copy.deepcopy(base_config)
    small["output"] = {"samples": 2, "shard_size": 2}
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump(small))
    assert launch.main(["run", "--config", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    (root / "file.txt").write_text("x")
    (root / "folder").mkdir()
    return root


def test_fuzzed_command_lines(cli_world, capsys):
    root = cli_world
    places = [str(root / name) for name in ("run", "small.yaml", "file.txt", "folder", "absent", "absent/deeper")]
    places += ["/proc/version", "/", "", "-", "--", "run"]
    numbers = ["0", "1", "-1", "3", "x", "1e3", "99999999999999999999"]
    words = st.one_of(
        st.sampled_from(places),
        st.sampled_from(numbers),
        st.sampled_from(["--config", "--out", "--json", "--verify", "--samples", "--seed", "--format", "--executor",
                         "--workers", "--address", "--examples", "--quiet", "folders", "coco", "hf", "ray", "local"]),
        st.text(max_size=6),
    )
    commands = st.sampled_from(["run", "plan", "inspect", "preview", "export", "nope"])

    @settings(max_examples=max(60, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(command=commands, rest=st.lists(words, max_size=6))
    def check(command, rest):
        argv = [command, *rest]
        if command == "run" and "--address" in rest:
            return  # would try to join a cluster
        if command == "run":
            argv += ["--executor", "local", "--quiet"]
        if command == "export":  # a fresh target, so a well-formed export really writes
            argv = [a if a != str(root / "folder") else tempfile.mkdtemp(dir=root) for a in argv]
        try:
            code = launch.main(argv)
        except SystemExit as error:  # argparse: usage line and one error line, exit 2
            captured = capsys.readouterr()
            assert error.code == 2, captured
            assert captured.err.strip().splitlines()[-1].startswith("maskmint")
            return
        one_clear_line(capsys, code if code != 1 else 2)

    check()


def test_nan_and_infinity_are_refused_where_they_make_no_sense(base_config, tmp_path, capsys):
    for section, field in [("generation", "guidance_scale"), ("mask", "tau"), ("refine", "delta_e")]:
        data = copy.deepcopy(base_config)
        data.setdefault(section, {})[field] = math.nan
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        assert launch.main(["plan", "--config", str(path)]) == 2
        assert f"{section}.{field}" in capsys.readouterr().err


# -- `run` itself on tiny models: what only the model can judge is judged before any work ------

RUN_EXAMPLES = int(os.environ.get("MASKMINT_FUZZ_RUN_EXAMPLES", "250"))
sizes = st.sampled_from([None, 8, 16, 24, 32, 40, 48])
indices = st.lists(st.integers(0, 5), min_size=1, max_size=3)


@st.composite
def runnable_configs(draw, families: dict) -> dict:
    """Configs that validate, drawn over the fields that meet the model: sizes, steps, what
    capture reads, the mask and removal options; one or two samples each."""
    family = draw(st.sampled_from(sorted(families)))
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = families[family]
    steps = draw(st.integers(1, 4))
    data["generation"] = {"steps": steps, "guidance_scale": draw(st.sampled_from([0.0, 1.0, 5.0])),
                          "batch_size": draw(st.integers(1, 3)), "height": draw(sizes), "width": draw(sizes)}
    dit = family != "sd"
    usual = draw(st.integers(0, 9)) > 0  # mostly what the family takes; sometimes not
    recipe = draw(st.sampled_from(["cross", "concept_attention"])) if dit or not usual else "cross"
    capture = {"steps": draw(st.one_of(st.none(), st.lists(st.integers(0, steps if usual else steps + 2), min_size=1,
                                                          max_size=3))),
               "include_mid_block": draw(st.booleans()),
               "skip_downscales": draw(st.lists(st.sampled_from([1, 2, 4, 8]), max_size=2 if usual else 3)),
               "weighting": draw(st.sampled_from(["per_map", "per_resolution"])),
               "recipe": recipe,
               "blocks": draw(st.one_of(st.none(), indices)) if dit or not usual else None}
    if draw(st.booleans()) and (not dit or not usual):
        capture |= {"self_attention": True, "self_attention_downscale": draw(st.integers(1, 4)),
                    "self_attention_power": draw(st.integers(1, 3))}
    data["capture"] = capture
    data["mask"] = {"threshold": draw(st.sampled_from(["fixed", "otsu", "gmm", "band"])),
                    "normalise": draw(st.sampled_from(["per_map", "none"])) if recipe != "cross" or not usual else "per_map",
                    "open_px": draw(st.integers(0, 3)), "close_px": draw(st.integers(0, 3))}
    data["removal"] = {"steps": draw(st.integers(1, 4)), "strength": draw(st.sampled_from([0.5, 1.0, 1.0])),
                       "dilate_px": draw(st.integers(0, 6)), "prefill": draw(st.booleans()),
                       "guidance_scale": draw(st.sampled_from([0.0, 5.0]))}
    data["prompts"]["concepts_per_image"] = draw(st.sampled_from([1, 2, [1, 2]]))
    data["prompts"]["templates"] = ["a photo of a {concept} in a {place}", "a {concept} and a {concept2} in a {place}"]
    data["output"] = {"samples": draw(st.integers(1, 2)), "shard_size": draw(st.integers(1, 2)),
                      "image_format": draw(st.sampled_from(["jpg", "png"]))}
    data["execution"] = {"executor": "local", "cpu_threads": 1, "max_attempts": draw(st.integers(1, 2))}
    return data


@pytest.fixture(scope="module")
def fuzz_families(tiny_model_dir, tmp_path_factory) -> dict:
    from maskmint.pipeline.testing.tiny_models import build_tiny_flux_pipeline

    flux = tmp_path_factory.mktemp("models") / "tiny-flux"
    build_tiny_flux_pipeline(seed=2, image_size=32).save_pretrained(flux)
    return {"sd": str(tiny_model_dir), "flux": str(flux)}


def test_fuzzed_runs_finish_or_are_refused_before_any_work(fuzz_families, capsys):
    """The oracle: exit 0, or exit 2 with one line and no shard written (no directory left
    behind either); never exit 1, never a traceback."""
    outcomes, reasons = Counter(), Counter()

    @settings(max_examples=RUN_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=runnable_configs(fuzz_families))
    def check(data):
        with tempfile.TemporaryDirectory() as scratch:
            path, out = Path(scratch) / "c.yaml", Path(scratch) / "run"
            path.write_text(yaml.safe_dump(data))
            code = launch.main(["run", "--config", str(path), "--out", str(out), "--quiet"])
            captured = capsys.readouterr()
            assert code in (0, 2) and "Traceback" not in captured.err, (code, captured.err, data)
            planned = launch.main(["plan", "--config", str(path), "--json"])
            plan_err = capsys.readouterr().err.strip().splitlines()
            if code == 2:
                lines = captured.err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (lines, data)
                assert not out.exists(), (lines, data, sorted(p.name for p in out.rglob("*")))
                assert planned == 2 and plan_err == lines, (plan_err, lines, data)  # known before any work
            else:
                assert sorted(p.name for p in (out / "shards").glob("*.tar")), data
                assert planned == 0, (plan_err, data)
            outcomes[code] += 1
            if code == 2:
                reasons[lines[0][:110]] += 1

    check()
    with capsys.disabled():
        print(f"\nfuzzed runs: {sum(outcomes.values())} ({outcomes[0]} ran, {outcomes[2]} refused in one line); "
              f"refused for: {dict(reasons.most_common(6))}")
    assert outcomes[0] > 0 and outcomes[2] > 0
