"""benchmarks/quality_settings.yaml is checked before a GPU run spends a call on it: every setting's overrides make
a valid recipe, names are unique and a `reuse` names a setting of the file (benchmarks/quality_sweep.check_settings,
which the sweep runs before it loads a model). A bad setting stops the check naming it."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_sweep  # noqa: E402
from sea_convert.recipe import load_recipe  # noqa: E402

SETTINGS = ROOT / "benchmarks" / "quality_settings.yaml"


def _base(spec):
    path = (SETTINGS.parent / spec["recipe"]).resolve()
    return load_recipe(path).model_dump(mode="json", by_alias=True, exclude_none=True), path.parent


def test_every_setting_of_the_file_makes_a_valid_recipe():
    spec = yaml.safe_load(SETTINGS.read_text())
    base, base_dir = _base(spec)
    recipes = quality_sweep.check_settings(spec, base, base_dir)
    assert list(recipes) == [s["name"] for s in spec["settings"]]
    hidden4 = recipes["i22-ctx2k-A-hidden4"]
    assert hidden4.sea.hidden_mult == 4 and hidden4.sea.predictor_rows == "block" and hidden4.distill.stage_b is None
    assert recipes["i22-ctx2k-AB-rank32"].distill.stage_b.lora_rank == 32


@pytest.mark.parametrize("bad,message", [
    ({"name": "x", "overrides": {"sea": {"hidden_mult": 0}}}, "setting x"),
    ({"name": "y", "reuse": "nowhere"}, "setting y: reuse names no setting"),
    ({"name": "i22-ctx2k-A"}, "settings named twice"),
])
def test_a_bad_setting_stops_the_check_naming_it(bad, message):
    spec = yaml.safe_load(SETTINGS.read_text())
    spec["settings"].append(bad)
    base, base_dir = _base(spec)
    with pytest.raises(SystemExit, match=message):
        quality_sweep.check_settings(spec, base, base_dir)
