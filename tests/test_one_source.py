"""Each list of allowed values has one source, each family's behaviour one room, and the
installed package is `maskmint` alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

from maskmint import launch
from maskmint.pipeline.executors import EXECUTORS
from maskmint.pipeline.export import FORMATS
from maskmint.schemas.config import ExecutorName, ExportFormat, FamilyName, ModelConfig, RecipeName
from maskmint.stages.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [REPO / "launch.py"] + [f for folder in ("pipeline", "stages", "schemas") for f in sorted((REPO / folder).rglob("*.py"))]


def choices_of(command: str, flag: str) -> tuple:
    parser = launch.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_the_config_literals_are_the_registries():
    assert set(get_args(FamilyName)) == set(FAMILIES)
    assert set(get_args(ModelConfig.model_fields["family"].annotation)) == {"auto", *FAMILIES}
    assert set(get_args(RecipeName)) == {recipe for family in FAMILIES.values() for recipe in family.recipes()}
    assert set(get_args(ExecutorName)) == set(EXECUTORS)
    assert set(get_args(ExportFormat)) == set(FORMATS)


def test_the_command_line_offers_the_same_choices():
    assert set(choices_of("run", "--executor")) == set(EXECUTORS)
    assert set(choices_of("export", "--format")) == set(FORMATS)


# What asking which family runs looks like: a component name, or a comparison with a family's tag.
FAMILY_DISPATCH = re.compile(r'"unet"|"transformer"|\battention [!=]=|\bdenoiser [!=]=|\brecipe [!=]=|hasattr\(')


def test_no_product_code_outside_the_families_dispatches_on_a_family():
    found = []
    for path in PRODUCT:
        if "families" in path.relative_to(REPO).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_DISPATCH.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_no_python_file_is_over_400_lines():
    files = [p for p in REPO.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(REPO).parts)]
    assert len(files) > 50
    assert {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 400} == {}


def test_stages_never_import_ray_or_the_pipeline():
    for path in (REPO / "stages").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import ray|from ray)", text, re.M), path
        assert "maskmint.pipeline" not in text, path


def test_the_installed_package_reads_shards_beside_a_project_with_its_own_pipeline_and_schemas(small, write_config,
                                                                                                 tmp_path):
    """The source installed (a real wheel build, no deps) into a target folder, imported from
    a folder holding its own `pipeline/`, `schemas/` and `stages/` packages, which must not be touched."""
    small_run = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(small)), "--out", str(small_run), "--quiet"]) == 0
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "runs",
                                                                 "__pycache__", ".hypothesis", ".ruff_cache"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, timeout=300)
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert installed == ["bin", "maskmint"] or installed == ["maskmint"], installed
    project = tmp_path / "training"
    for name in ("pipeline", "schemas", "stages"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the project\\'s own {name} was imported')\n")
    script = textwrap.dedent(f"""
        import maskmint
        from maskmint import segmentation_dataset
        assert maskmint.__file__.startswith({str(target)!r}), maskmint.__file__
        samples = list(segmentation_dataset({str(small_run)!r}, size=32, train=False))
        image, mask = samples[0]
        print(len(samples), tuple(image.shape), tuple(mask.shape))
    """)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "(3,", "32,", "32)", "(32,", "32)"]  # every sample of the run
