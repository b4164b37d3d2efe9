"""Bulk production: prompts and classes from files and presets, `plan` before a run, review of
the worst samples, and the shards read by HF datasets and pycocotools."""

from __future__ import annotations

import copy
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskmint import launch
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def jsonl_config(config_dict, tmp_path) -> dict:
    rows = [
        {"prompt": "a photo of a dog in a park", "concepts": ["dog"]},
        "",  # blank lines are skipped
        {"prompt": "a zebra and a puppy in a kitchen", "concepts": ["zebra", {"word": "puppy", "class": "dog"}]},
        {"prompt": "a zebra in a park", "concepts": [{"word": "zebra", "class": 7}], "background": "an empty park"},
    ]
    data = copy.deepcopy(config_dict)
    data["prompts"] = {"concepts": data["prompts"]["concepts"], "file": str(write_lines(tmp_path / "p.jsonl", rows))}
    return data


def plan_json(capsys, config_path, *extra) -> dict:
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(config_path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_jsonl_prompts_plan_spans_and_classes(jsonl_config, write_config, capsys):
    jsonl_config["output"] = {"samples": 7, "shard_size": 3}
    report = plan_json(capsys, write_config(jsonl_config), "--examples", "4")
    # 7 samples cycle the 3 lines: dog+?, (zebra, dog), zebra -> lines used 3, 2, 2 times
    assert report["classes"] == {"dog": 3 + 2, "zebra": 2 + 2}
    assert report["samples"] == 7 and report["shards"] == 3
    examples = report["examples"]
    assert [e["prompt"] for e in examples] == ["a photo of a dog in a park", "a zebra and a puppy in a kitchen",
                                               "a zebra in a park", "a photo of a dog in a park"]
    assert examples[1]["background_prompt"] == "in a kitchen"  # both concepts and the join between them go
    assert examples[2]["background_prompt"] == "an empty park"

    from maskmint.pipeline.plan import Plan
    from maskmint.stages.models import load_text_layout

    config = load_config(write_config(jsonl_config))
    layout = load_text_layout(config.model)
    tokenizer = layout.segments[0].tokenizer
    plan = Plan(config, layout)
    two = plan.sample(1)
    assert [(c.name, c.class_id, c.word) for c in two.concepts] == [("zebra", 7, "zebra"), ("dog", 1, "puppy")]
    ids = tokenizer(two.prompt).input_ids
    puppy = two.concepts[1]
    assert tokenizer.decode([ids[p] for p in puppy.token_positions]).strip() == "puppy"
    assert two.prompt[slice(*puppy.char_span)] == "puppy"
    assert "zebra" in two.background_negative_prompt and "dog" in two.background_negative_prompt
    assert plan.sample(4).prompt == two.prompt and plan.sample(4).seed != two.seed  # same line, new seed


def test_plan_reads_the_prompts_file_through_once_and_sees_an_edit(jsonl_config, write_config, capsys, monkeypatch):
    import builtins

    from maskmint.schemas import prompts

    path = jsonl_config["prompts"]["file"]
    jsonl_config["output"].pop("samples", None)  # one sample per line
    passes = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if str(file).endswith("p.jsonl"):
            passes.append(handle)
        return handle

    monkeypatch.setattr(prompts, "open", counting_open, raising=False)
    prompts._scan.cache_clear()
    first = plan_json(capsys, write_config(jsonl_config))
    first_hash = load_config(write_config(jsonl_config)).config_hash()
    assert first["samples"] == 3 and len(passes) == 1  # count, hash, line index and cost from one pass
    with real_open(path, "a") as handle:
        handle.write(json.dumps({"prompt": "a dog on a sofa", "concepts": ["dog"]}) + "\n")
    second = plan_json(capsys, write_config(jsonl_config))
    assert second["samples"] == 4 and len(passes) == 2
    assert load_config(write_config(jsonl_config)).config_hash() != first_hash


@pytest.mark.parametrize(
    "line, words",
    [
        ({"prompt": "a horse in a park", "concepts": ["horse"]}, "class 'horse' is not one of the run's classes"),
        ({"prompt": "a photo of a cat", "concepts": [{"word": "dog", "class": "dog"}]}, "the word 'dog' does not occur"),
        ('{"prompt": "a dog", "concepts": ["dog"]', "line"),  # not JSON
        ({"prompt": "a dog"}, "concepts"),
        ({"prompt": "a photo " * 40 + "of a dog", "concepts": ["dog"]}, "outside the first"),
    ],
)
def test_jsonl_errors_name_the_line(jsonl_config, write_config, tmp_path, capsys, line, words):
    rows = [{"prompt": "a dog in a park", "concepts": ["dog"]}, "", line]
    jsonl_config["prompts"]["file"] = str(write_lines(tmp_path / "bad.jsonl", rows))
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(write_config(jsonl_config))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts.file line 3" in err[0] and words in err[0], err


def test_jsonl_run_writes_both_concepts(jsonl_config, write_config, tmp_path):
    import webdataset as wds

    jsonl_config["output"] = {"samples": 3, "shard_size": 3}
    jsonl_config["mask"] = {"tau": 0.05, "min_area": 0.0}  # a random model's maps: keep every sample
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(jsonl_config)), "--out", str(out), "--quiet"]) == 0
    samples = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "000000.tar"), shardshuffle=False).decode("rgb8")}
    stats = RunDir(out).shard_stats()[0]
    assert stats.dropped == {} and sorted(samples) == ["0000000000", "0000000001", "0000000002"]
    two = samples["0000000001"]
    meta = two["json"]
    assert [c["class_id"] for c in meta["concepts"]] == [7, 1] == stats.classes["0000000001"]
    heat = two["heatmap.png"][..., 0]
    assert heat.shape == (32, 64)  # one map per concept, side by side
    assert set(np.unique(two["mask.png"][..., 0])) <= {0, 1, 7, 255}


def test_concepts_file_both_forms_and_errors(config_dict, tmp_path):
    data = copy.deepcopy(config_dict)
    del data["prompts"]["concepts"]
    data["prompts"]["concepts_file"] = str(write_lines(tmp_path / "names.txt", ["# mine", "dog", "", "zebra  # striped"]))
    config = parse_config(data)
    assert [(c.class_id, c.name) for c in config.prompts.concepts] == [(1, "dog"), (2, "zebra")]
    data["prompts"]["concepts_file"] = str(write_lines(tmp_path / "ids.txt", ["12,dog,puppy|hound", "7,zebra"]))
    config = parse_config(data)
    assert [(c.class_id, c.name, c.synonyms) for c in config.prompts.concepts] == [(12, "dog", ["puppy", "hound"]), (7, "zebra", [])]
    assert parse_config(config.to_json_dict()).prompts.concepts == config.prompts.concepts  # run.json reads back

    for rows, words in [
        (["dog", "7,zebra"], "line 2: mixes"),
        (["1,dog", "x,zebra"], "line 2"),
        (["1,dog", "300,zebra"], "line 2"),
        (["1,dog", "1,zebra"], "class_id values must be unique"),
        (["# nothing"], "lists no class"),
    ]:
        data["prompts"]["concepts_file"] = str(write_lines(tmp_path / "bad.txt", rows))
        with pytest.raises(ConfigError, match=words):
            parse_config(data)


def test_presets_carry_the_benchmarks_ids(config_dict):
    data = copy.deepcopy(config_dict)
    del data["prompts"]["concepts"]
    data["prompts"]["preset"] = "voc"
    voc = {c.name: c.class_id for c in parse_config(data).prompts.concepts}
    assert len(voc) == 20 and voc["aeroplane"] == 1 and voc["dog"] == 12 and voc["tv monitor"] == 20
    data["prompts"]["preset"] = "coco"
    coco = {c.name: c.class_id for c in parse_config(data).prompts.concepts}
    assert len(coco) == 80 and coco["person"] == 1 and coco["dog"] == 18 and coco["toothbrush"] == 90
    assert 12 not in coco.values() and 26 not in coco.values()  # COCO's gaps
    data["prompts"]["concepts"] = [{"name": "dog", "class_id": 1}]
    with pytest.raises(ConfigError, match="not both"):
        parse_config(data)


def test_one_line_configs_shipped_run(tmp_path, capsys, write_config):
    """configs/jsonl.yaml: a class file and a JSONL of prompts on the embedded model, planned
    and run (fewer samples, in process)."""
    import yaml

    report = plan_json(capsys, REPO / "configs" / "jsonl.yaml")
    assert report["classes"] == {"circle": 8, "square": 8, "triangle": 8}
    data = yaml.safe_load((REPO / "configs" / "jsonl.yaml").read_text())
    for key in ("path",):
        data["model"][key] = str((REPO / "configs" / data["model"][key]).resolve())
    for key in ("concepts_file", "file"):
        data["prompts"][key] = str((REPO / "configs" / data["prompts"][key]).resolve())
    data["output"] = {"samples": 8, "shard_size": 8}
    data["execution"] = {"executor": "local"}
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(out), "--quiet"]) == 0
    stats = RunDir(out).shard_stats()[0]
    lines = [json.loads(line) for line in (REPO / "configs" / "toy-prompts.jsonl").read_text().splitlines()]
    names = {1: "circle", 2: "square", 3: "triangle"}
    assert [names[c] for k in sorted(stats.classes) for c in stats.classes[k]] == [line["concepts"][0] for line in lines[:8]]


def counted_tflop(path: Path, tmp_path: Path) -> float:
    """TFLOPs torch counts over the model stages of sample 0 (math attention, so attention
    matmuls are counted); its weak mask must be non-empty, so removal runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from maskmint.pipeline.worker import ShardWorker, as_columns

    worker = ShardWorker(load_config(path), tmp_path / "scratch")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = worker.model_stages(as_columns([worker.plan.sample(0)]), defaultdict(float))
    worker.close()
    assert out["weak_mask"].any()
    return counter.get_total_flops() / 1e12


def test_plan_counts_and_cost_against_a_counted_run(config_dict, write_config, capsys, tmp_path):
    """The plan's FLOPs per triple against torch's counter over the real model stages (math
    attention, so attention matmuls are counted), for both removal paths."""
    for removal in ({"steps": 3, "guidance_scale": 5.0}, {"steps": 4, "strength": 0.75, "guidance_scale": 1.0, "prefill": True}):
        data = copy.deepcopy(config_dict)
        data["removal"] = removal
        data["generation"]["batch_size"] = 1
        data["mask"] = {"tau": 0.01, "min_area": 0.0}  # a non-empty region, so removal runs
        data["output"] = {"samples": 10, "shard_size": 4}
        path = write_config(data)
        report = plan_json(capsys, path, "--peak-tflops", "2", "--utilisation", "0.5")
        assert report["samples"] == 10 and report["shards"] == 3 and report["classes"] == {"dog": 5, "zebra": 5}
        cost = report["cost"]
        counted = counted_tflop(path, tmp_path)
        assert abs(cost["tflop_per_triple"] - counted) / counted < 0.02, (cost, counted)
        assert cost["run_pflop"] == pytest.approx(cost["tflop_per_triple"] * 10 / 1000, rel=1e-3)
        assert cost["device_seconds"] == pytest.approx(cost["run_pflop"] * 1e3 / (2 * 0.5), rel=1e-3)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_plan_counts_annotate_cost_against_a_counted_run(config_dict, write_config, capsys, tmp_path, guidance):
    """An annotated sample's FLOPs: its own steps and guidance (not generation's), its encodes."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "lines.jsonl").write_text(json.dumps({"image": "photo.png", "prompt": "a dog", "concepts": ["dog"]}) + "\n")
    data = copy.deepcopy(config_dict)
    data["prompts"]["file"] = str(tmp_path / "lines.jsonl")
    data["annotate"] = {"steps": 6, "strength": 0.5, "guidance_scale": guidance}
    data["generation"]["batch_size"] = 1
    data["mask"] = {"tau": 0.01, "min_area": 0.0}
    path = write_config(data)
    cost = plan_json(capsys, path)["cost"]
    assert "generate_denoiser" not in cost["by_part_tflop"]
    counted = counted_tflop(path, tmp_path)
    assert abs(cost["tflop_per_triple"] - counted) / counted < 0.02, (cost, counted)


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    data = json.loads(json.dumps(__import__("tests.conftest", fromlist=["BASE_CONFIG"]).BASE_CONFIG))
    data["model"]["path"] = str(tiny_model_dir)
    data["mask"] = {"tau": 0.3}
    root = tmp_path_factory.mktemp("bulk")
    path = root / "c.yaml"
    path.write_text(json.dumps(data))
    out = root / "run"
    assert launch.main(["run", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    return out


def stored_masks(out: Path) -> dict[str, np.ndarray]:
    import tarfile

    masks = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mask.png"):
                    masks[member.name.split(".")[0]] = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return masks


def test_worst_n_order_and_per_class(small_run, tmp_path, capsys):
    stats = [json.loads(p.read_text()) for p in sorted((small_run / "shards").glob("*.json"))]
    scores = {k: (v["weak_refined_iou"], s["classes"][k]) for s in stats for k, v in s["scores"].items()}
    expected = sorted(scores, key=lambda k: (scores[k][0], k))[:3]
    capsys.readouterr()
    assert launch.main(["preview", str(small_run), "--out", str(tmp_path / "w.png"), "--by", "weak_refined_iou", "--worst", "3"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == expected
    sheet = np.array(Image.open(tmp_path / "w.png"))
    assert sheet.shape[0] == 18 + 3 * (18 + 128)

    assert launch.main(["preview", str(small_run), "--out", str(tmp_path / "c.png"), "--by", "mask_fraction",
                        "--worst", "1", "--per-class", "--highest"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    by_class = defaultdict(list)
    for key, (_, classes) in scores.items():
        for c in classes:
            by_class[c].append(key)
    mask_fraction = {k: v["mask_fraction"] for s in stats for k, v in s["scores"].items()}
    assert [(int(r[1]), r[2]) for r in rows] == [
        (c, sorted(keys, key=lambda k: (-mask_fraction[k], k))[0]) for c, keys in sorted(by_class.items())
    ]

    assert launch.main(["preview", str(small_run), "--out", str(tmp_path / "x.png"), "--by", "nonsense"]) == 2
    assert "its scores: components" in capsys.readouterr().err


def test_card_counts_per_class(small_run):
    card = (small_run / "README.md").read_text()
    stats = [json.loads(p.read_text()) for p in sorted((small_run / "shards").glob("*.json"))]
    written = Counter(c for s in stats for k in s["written"] for c in s["classes"][k])
    assert f"| 1 | dog | {written[1]} |" in card and f"| 7 | zebra | {written[7]} |" in card
    assert "| score | all | dog | zebra |" in card


def test_hf_datasets_read_the_shards_with_no_glue(small_run):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (small_run / "shards").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    masks = stored_masks(small_run)
    assert sorted(ds["__key__"]) == sorted(masks)
    for row in ds:
        mask = np.array(row["mask.png"])
        assert mask.ndim == 2 and np.array_equal(mask, masks[row["__key__"]])
        assert set(np.unique(mask)) <= {0, 255, *[c["class_id"] for c in row["json"]["concepts"]]}


def test_hf_export_round_trip(small_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert launch.main(["export", str(small_run), "--out", str(out), "--format", "hf"]) == 0
    ds = datasets.load_from_disk(str(out))
    names = ds.features["classes"].feature.names
    assert names[0] == "background" and names[1] == "dog" and names[7] == "zebra"
    masks = stored_masks(small_run)
    assert sorted(ds["key"]) == sorted(masks)
    for row in ds:
        assert np.array_equal(np.array(row["mask"]), masks[row["key"]])
        assert row["classes"] == [c["class_id"] for c in json.loads(row["metadata"])["concepts"]]
        assert np.array(row["image"]).shape == (32, 32, 3)


def test_coco_export_decoded_by_pycocotools(small_run, tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    from pycocotools import mask as mask_utils

    out = tmp_path / "coco"
    assert launch.main(["export", str(small_run), "--out", str(out), "--format", "coco"]) == 0
    coco = coco_module.COCO(str(out / "annotations.json"))
    masks = stored_masks(small_run)
    assert len(coco.getImgIds()) == len(masks)
    for image in coco.loadImgs(coco.getImgIds()):
        stored = masks[image["maskmint_key"]]
        rebuilt = np.zeros_like(stored)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            rle = mask_utils.frPyObjects(annotation["segmentation"], image["height"], image["width"])
            region = mask_utils.decode(rle).astype(bool)
            assert not rebuilt[region].any()  # instances do not overlap
            rebuilt[region] = annotation["category_id"]
            assert annotation["iscrowd"] == 0 and annotation["area"] == region.sum() == mask_utils.area(rle)
            assert np.allclose(annotation["bbox"], mask_utils.toBbox(rle))
        labelled = (stored != 0) & (stored != 255)
        assert np.array_equal(rebuilt[labelled], stored[labelled]) and not rebuilt[~labelled].any()
