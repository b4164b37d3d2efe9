"""Early drops: the samples the weak mask rules out skip removal, and nothing written changes."""

from __future__ import annotations

import copy
import json

import pytest

from maskmint import launch
from maskmint.stages import remove
from tests.conftest import tar_fields


class CountingPipe:
    """The inpainting pipeline, counting the images it is asked to inpaint. `skew`: its
    output also shifts by one level per image in the call, as a kernel whose rounding
    depends on the batch's size would (much larger than such rounding, to be seen)."""

    def __init__(self, pipe, counts: list[int], skew: bool = False):
        self._pipe, self._counts, self._skew = pipe, counts, skew

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self._counts.append(len(kwargs["generator"]))
        out = self._pipe(**kwargs)
        if self._skew:
            out.images = out.images + len(kwargs["generator"]) / 255.0
        return out


def _wrap_removal(monkeypatch, skew: bool) -> list[int]:
    counts: list[int] = []
    original = remove.Remove.__init__

    def counting_init(self, pipe, *args, **kwargs):
        original(self, CountingPipe(pipe, counts, skew), *args, **kwargs)

    monkeypatch.setattr(remove.Remove, "__init__", counting_init)
    return counts


@pytest.fixture
def counted_removal(monkeypatch):
    return _wrap_removal(monkeypatch, skew=False)


@pytest.fixture
def batch_size_rounding_removal(monkeypatch):
    return _wrap_removal(monkeypatch, skew=True)


def _reasons(out) -> dict[str, str]:
    reasons = {}
    for stats in sorted((out / "shards").glob("*.json")):
        reasons.update(json.loads(stats.read_text())["dropped"])
    return reasons


def _run(data, early: bool, write_config, out, counts: list[int]) -> tuple[dict, dict, int, float]:
    """The run's tars, drop reasons, images inpainted and the TFLOPs torch counted over it
    (math attention, so attention matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    data = copy.deepcopy(data)
    data["execution"]["early_drops"] = early
    counts.clear()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        assert launch.main(["run", "--config", str(write_config(data, f"{early}.yaml")), "--out", str(out),
                            "--quiet"]) == 0
    return tar_fields(out), _reasons(out), sum(counts), counter.get_total_flops() / 1e12


def _dropping(config_dict) -> dict:
    """A config whose weak masks rule samples out, for a concept they lack and for their size."""
    data = copy.deepcopy(config_dict)
    data["prompts"]["concepts_per_image"] = [1, 2]
    data["prompts"]["templates"] = ["a photo of a {concept} in a {place}", "a {concept} and a {concept2} in a {place}"]
    data["mask"] = {"tau": 0.6, "min_area": 0.05}
    data["filter"].update({"max_weak_fraction": 0.35})
    data["output"] = {"samples": 18, "shard_size": 6}
    return data


def test_kept_samples_match_where_removal_rounds_by_its_batch_size(config_dict, write_config, tmp_path,
                                                                   batch_size_rounding_removal):
    """Without early drops the ruled-out samples are removed in a call of their own, so the
    survivors' batch, and with it their bytes, is the one early drops gives them."""
    data = _dropping(config_dict)
    late = _run(data, False, write_config, tmp_path / "late", batch_size_rounding_removal)
    early = _run(data, True, write_config, tmp_path / "early", batch_size_rounding_removal)
    assert early[0] == late[0] and early[1] == late[1]
    assert late[2] > early[2]  # the ruled-out samples were still inpainted without early drops


def test_early_drops_write_the_same_tars_and_reasons_and_skip_removal(config_dict, write_config, tmp_path,
                                                                    counted_removal, capsys):
    data = _dropping(config_dict)
    late, late_reasons, late_inpainted, late_tflop = _run(data, False, write_config, tmp_path / "late", counted_removal)
    early, early_reasons, early_inpainted, early_tflop = _run(data, True, write_config, tmp_path / "early",
                                                              counted_removal)

    assert early == late  # every kept sample, field for field, byte for byte
    assert early_reasons == late_reasons
    decided_early = {k for k, r in late_reasons.items() if r in ("missing_concept", "full_weak_mask", "empty_mask")}
    # the case is real: samples kept, and dropped before removal for a concept the weak mask lacks and for its size
    assert len(late) >= 6 and {"missing_concept", "full_weak_mask"} <= set(late_reasons.values()), late_reasons
    empty = sum(r == "empty_weak_mask" for r in late_reasons.values())  # never inpainted either way
    assert late_inpainted == 18 - empty
    assert early_inpainted == 18 - empty - len(decided_early)  # removal ran on the survivors alone
    # the hash does not see it: a run may switch on resume
    assert json.loads((tmp_path / "early" / "run.json").read_text())["config_hash"] == \
        json.loads((tmp_path / "late" / "run.json").read_text())["config_hash"]

    # plan, given a finished run's drop rates, says what a kept triple costs: as counted
    for run, is_early, counted in (("early", True, early_tflop), ("late", False, late_tflop)):
        config = copy.deepcopy(data)
        config["execution"]["early_drops"] = is_early
        capsys.readouterr()
        assert launch.main(["plan", "--config", str(write_config(config, "plan.yaml")), "--drops-from",
                            str(tmp_path / run), "--json"]) == 0
        cost = json.loads(capsys.readouterr().out)["cost"]
        assert cost["drop_rates"]["before_removal"] == pytest.approx((len(decided_early) + empty) / 18)
        assert cost["expected_kept"] == pytest.approx(len(early))
        assert cost["tflop_per_kept_triple"] == pytest.approx(counted / len(early), rel=0.03), (run, cost, counted)
    assert early_tflop < late_tflop
