"""Strict params: every problem raises ParamsError naming the key; YAML is loaded safely."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from headstart import choices
from headstart.backbone_specs import BACKBONES
from headstart.choices import SAMPLERS, SELECT
from headstart.export import EXPORT_FORMATS
from headstart.familiarity import FOREIGN
from headstart.heads import HEADS
from headstart.inference import TTA_WRAPPERS
from headstart.params import CLASS_WEIGHTS, Params, ParamsError, load_params, parse_params
from headstart.params_doc import params_reference
from headstart.transforms import AUGMENTATIONS

PROJECT = Path(__file__).resolve().parents[1]


def test_shipped_params_load():
    params = load_params(PROJECT / "params.yaml")
    assert isinstance(params, Params)
    assert params.backbone.name in BACKBONES
    assert isinstance(params.head.lr, float)
    assert isinstance(params.head.epochs, int)


def test_fixture_params_have_the_shipped_structure(params_dict):
    """The test params must stay a faithful copy of the real file's sections and keys."""
    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    assert list(params_dict) == list(shipped)
    for section, keys in shipped.items():
        assert sorted(params_dict[section]) == sorted(keys), section
    parse_params(params_dict)  # and they are valid


def test_written_params_round_trip(tmp_path, params_dict, write_params):
    params = load_params(write_params(tmp_path, params_dict))
    assert params.backbone.image_size == 32
    assert params.backbone.weights == "none"
    assert params.head.epochs == 3
    assert params.finetune.unfreeze == 1


def test_yaml_1_2_float_without_dot(tmp_path, params_dict, write_params):
    path = write_params(tmp_path, params_dict)
    text = path.read_text(encoding="utf-8")
    assert "lr: 0.01\n" in text
    path.write_text(text.replace("lr: 0.01\n", "lr: 1e-3\n"), encoding="utf-8")
    params = load_params(path)
    assert params.head.lr == 0.001
    assert type(params.head.lr) is float


def test_int_widens_to_float(params_dict):
    params_dict["head"]["lr"] = 1
    params = parse_params(params_dict)
    assert params.head.lr == 1.0
    assert type(params.head.lr) is float


def _set(mapping: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".")
    mapping[section][key] = value
    return mapping


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("head.epochs", "ten"),
        ("head.epochs", 10.0),
        ("head.epochs", True),
        ("head.lr", "abc"),
        ("head.lr", None),
        ("data.seed", "42x"),
        ("data.dir", 123),
        ("backbone.image_size", 64.0),
        ("finetune.augment", 1),
        ("evaluate.calibrate", "yes"),
        ("evaluate.calibrate", 1),
        ("compute.threads", 2.0),
    ],
)
def test_wrong_type_names_the_key(params_dict, key, value):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(_set(params_dict, key, value))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("head.lr", -1.0e-3),
        ("head.lr", 0.0),
        ("finetune.lr_backbone", -1.0),
        ("head.epochs", 0),
        ("finetune.unfreeze", -1),
        ("head.label_smoothing", 1.0),
        ("head.kind", "svm"),
        ("finetune.bn", "sometimes"),
        ("finetune.augment", "heavy"),
        ("head.class_weight", "inverse"),
        ("finetune.class_weight", "auto"),
        ("compute.device", "tpu"),
        ("inference.batch_size", 0),
        ("compute.precision", "half"),
        ("compute.threads", 0),
        ("compute.threads", "many"),
        ("backbone.image_size", 8),
        ("backbone.image_size", "large"),
        ("data.val_fraction", 0.0),
        ("data.test_fraction", 1.0),
    ],
)
def test_out_of_range_names_the_key(params_dict, key, value):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(_set(params_dict, key, value))


def test_fractions_summing_too_high(params_dict):
    params_dict["data"]["val_fraction"] = 0.5
    params_dict["data"]["test_fraction"] = 0.45
    with pytest.raises(ParamsError, match=r"data\.val_fraction") as error:
        parse_params(params_dict)
    assert "data.test_fraction" in str(error.value)


def test_unknown_key_names_it(params_dict):
    params_dict["head"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"head\.learning_rate"):
        parse_params(params_dict)


def test_missing_key_names_it(params_dict):
    del params_dict["finetune"]["patience"]
    with pytest.raises(ParamsError, match=r"finetune\.patience"):
        parse_params(params_dict)


def test_unknown_section_names_it(params_dict):
    params_dict["optimizer"] = {"lr": 0.1}
    with pytest.raises(ParamsError, match="optimizer"):
        parse_params(params_dict)


def test_missing_section_names_it(params_dict):
    del params_dict["compute"]
    with pytest.raises(ParamsError, match="compute"):
        parse_params(params_dict)


def test_section_not_a_mapping(params_dict):
    params_dict["head"] = ["lr", 0.1]
    with pytest.raises(ParamsError, match="head"):
        parse_params(params_dict)


def test_unknown_backbone_lists_known_ones(params_dict):
    params_dict["backbone"]["name"] = "resnet19"
    with pytest.raises(ParamsError, match=r"backbone\.name") as error:
        parse_params(params_dict)
    message = str(error.value)
    assert "resnet19" in message
    for name in BACKBONES:
        assert name in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError, match="nowhere"):
        load_params(path)


def test_invalid_yaml_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("head: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_python_tags_are_not_executed(tmp_path, params_dict, write_params):
    marker = tmp_path / "MARKER"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = write_params(tmp_path, params_dict)
    text = path.read_text(encoding="utf-8").replace("lr: 0.01\n", f"lr: {payload}\n")
    assert payload in text
    path.write_text(text, encoding="utf-8")

    # The payload is live: an unsafe loader would run it.
    control = tmp_path / "control"
    control.mkdir()
    yaml.unsafe_load(text.replace(str(marker), str(control / "MARKER")))
    assert (control / "MARKER").exists()

    with pytest.raises(ParamsError):
        load_params(path)
    assert not marker.exists()


def test_yaml_is_read_as_dvc_reads_it(tmp_path, params_dict, write_params):
    """DVC parses params.yaml as YAML 1.2 (ruamel): `012` is 12 (not octal 10), `on` is the
    string 'on' (not True). Our loader must agree, or a stage would see other values than
    `dvc params diff` shows."""
    from ruamel.yaml import YAML

    path = write_params(tmp_path, params_dict)
    text = path.read_text(encoding="utf-8")
    text = text.replace("seed: 0", "seed: 012", 1).replace("augment: light", "augment: on")
    path.write_text(text, encoding="utf-8")
    as_dvc_reads_it = YAML(typ="safe", pure=True).load(text)
    assert as_dvc_reads_it["finetune"]["augment"] == "on"
    with pytest.raises(ParamsError, match="finetune.augment"):
        load_params(path)  # 'on' is a string, and not an allowed value
    path.write_text(text.replace("augment: on", "augment: light"), encoding="utf-8")
    params = load_params(path)
    seeds = [s.seed for s in (params.data, params.head, params.finetune) if s.seed == 12]
    assert seeds, "012 must read as 12, as DVC reads it"


def test_unfreeze_beyond_the_backbone_fails_before_any_work(params_dict):
    params_dict["backbone"]["name"] = "resnet18"  # 4 blocks
    params_dict["finetune"]["unfreeze"] = 4
    parse_params(params_dict)
    params_dict["finetune"]["unfreeze"] = 5
    with pytest.raises(
        ParamsError, match=r"finetune.unfreeze: 5 is more blocks than resnet18 has \(4\)"
    ):
        parse_params(params_dict)


def test_a_renamed_key_names_the_new_one(params_dict):
    params_dict["compute"]["batch_size"] = params_dict.pop("inference")["batch_size"]
    with pytest.raises(ParamsError, match=r"compute\.batch_size is now inference\.batch_size"):
        parse_params(params_dict)


def test_the_new_key_missing_names_the_old_one(params_dict):
    del params_dict["inference"]["batch_size"]
    with pytest.raises(ParamsError, match=r"missing key inference\.batch_size \(it was compute"):
        parse_params(params_dict)


def _documented_keys(markdown: str) -> set[str]:
    """The keys in the reference's tables (`section.key` in a row's first cell), not counting
    the table of renamed keys at the end."""
    tables = markdown.partition("## Renamed keys")[0]
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", tables, flags=re.MULTILINE))


def test_docs_params_md_is_the_generated_reference():
    """docs/params.md is `headstart params` verbatim: regenerate it when a field doc changes
    (headstart params > docs/params.md)."""
    committed = (PROJECT / "docs" / "params.md").read_text(encoding="utf-8")
    assert committed == params_reference(), "run: headstart params > docs/params.md"


def test_the_reference_lists_exactly_the_keys_the_dataclasses_accept():
    accepted = {
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Params)
        for key in dataclasses.fields(typing.get_type_hints(Params)[section.name])
    }
    assert _documented_keys(params_reference()) == accepted
    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    assert {f"{s}.{k}" for s, keys in shipped.items() for k in keys} == accepted
    # Every key has a sentence of its own, not an empty cell.
    for section in dataclasses.fields(Params):
        for key in dataclasses.fields(typing.get_type_hints(Params)[section.name]):
            assert len(key.metadata["doc"]) > 10, f"{section.name}.{key.name}"


def test_each_registry_holds_exactly_the_names_params_accepts_in_order():
    assert tuple(HEADS) == choices.HEADS
    assert tuple(AUGMENTATIONS) == choices.AUGMENTATIONS
    assert tuple(TTA_WRAPPERS) == choices.TTA
    assert tuple(FOREIGN) == choices.FOREIGN
    suffixes = {name: spec.suffix for name, spec in EXPORT_FORMATS.items()}
    assert suffixes == choices.EXPORT_SUFFIXES
    assert list(suffixes) == list(choices.EXPORT_SUFFIXES)


def test_reading_params_imports_no_torch():
    # prepare reads params and runs no model: it must not pay torch's import (seconds).
    code = (
        "import sys; from headstart.params import load_params; "
        f"load_params({str(PROJECT / 'params.yaml')!r}); "
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("head.kind", HEADS),
        ("head.select", SELECT),
        ("head.class_weight", CLASS_WEIGHTS),
        ("finetune.augment", AUGMENTATIONS),
        ("finetune.sampler", SAMPLERS),
        ("finetune.select", SELECT),
        ("finetune.class_weight", CLASS_WEIGHTS),
        ("evaluate.tta", TTA_WRAPPERS),
    ],
)
def test_registry_keys_accept_every_entry_and_nothing_else(params_dict, key, registry):
    section, name = key.split(".")
    for entry in registry:
        params_dict[section][name] = entry
        assert getattr(getattr(parse_params(params_dict), section), name) == entry
    params_dict[section][name] = "no_such_entry"
    with pytest.raises(ParamsError, match=re.escape(key)):
        parse_params(params_dict)
    assert all(entry in params_reference() for entry in registry)


@pytest.mark.parametrize(
    ("key", "bad", "good"),
    [
        ("finetune.mixup", -0.1, 0.2),
        ("finetune.cutmix", -1.0, 1.0),
        ("finetune.layer_decay", 0.0, 0.75),
        ("finetune.layer_decay", 1.5, 1.0),
        ("finetune.ema", 1.0, 0.999),
        ("finetune.ema", -0.5, 0.0),
        ("finetune.drop_path", 1.0, 0.1),
    ],
)
def test_recipe_numbers_are_range_checked_naming_the_key(params_dict, key, bad, good):
    section, name = key.split(".")
    params_dict[section][name] = good
    assert getattr(getattr(parse_params(params_dict), section), name) == good
    params_dict[section][name] = bad
    with pytest.raises(ParamsError, match=re.escape(key)):
        parse_params(params_dict)
