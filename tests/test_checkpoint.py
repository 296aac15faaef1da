"""Model lookup, override parsing and checkpoint I/O shared by every script."""
import os

import pytest
import torch

from helpers.utils.checkpoint import (atomic_save, extract_state_dict,
                                identify_variant, load_checkpoint_file, load_model_weights)
from helpers.utils.cli import JobError
from helpers.utils.models import create_model, model_names, parse_model_overrides


def test_every_registered_name_is_reachable_from_one_lookup():
    names = model_names()
    assert names[:5] == ["DiC-S", "DiC-B", "DiC-XL", "DiC-H", "DiC-Tiny"]
    assert "DiT-XL/2" in names and "DiT-S/8" in names and len(names) == 23   # 5 DiC, 12 DiT, 6 DiCo
    model = create_model("DiT-S/8", input_size=16, num_classes=10)
    assert model.out_channels == 8 and model.num_classes == 10


def test_unknown_model_and_unknown_override_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown model 'DiC-Q': choose one of DiC-S, .*DiT-XL/2"):
        create_model("DiC-Q")
    with pytest.raises(ValueError, match=r"DiC-Tiny does not take 'skip_strid'"):
        create_model("DiC-Tiny", skip_strid=1)


def test_official_style_overrides_are_parsed_as_literals():
    extra = ["--network_g__skip_stride=1", "--network_g__depth=(1, 1, 1, 1, 1)",
             "--network_g__gating", "False", "--network_g__name=abc"]
    assert parse_model_overrides(extra) == {"skip_stride": 1, "depth": (1, 1, 1, 1, 1),
                                           "gating": False, "name": "abc"}
    model = create_model("DiC-Tiny", num_classes=10, **parse_model_overrides(extra[:2]))
    assert model.skip_stride == 1 and tuple(model.depth) == (1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"unrecognised argument '--epoch'"):
        parse_model_overrides(["--epoch", "3"])
    with pytest.raises(ValueError, match=r"has no value"):
        parse_model_overrides(["--network_g__skip_stride"])


def test_atomic_save_never_overwrites_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ckpt" / "0000001.pt"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint_file(str(path))["a"], torch.arange(3))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))      # untouched
    assert os.listdir(path.parent) == ["0000001.pt"]                 # no temp file left
    atomic_save({"a": torch.ones(1)}, path, overwrite=True)
    assert torch.equal(torch.load(path)["a"], torch.ones(1))


def test_unreadable_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(JobError, match="cannot be read"):
        load_checkpoint_file(str(bad))


def test_extract_state_dict_reads_ours_dit_style_and_bare_files():
    weights = {"w": torch.ones(2)}
    ema = {"w": torch.zeros(2)}
    ours = {"model": weights, "ema": ema, "opt": {}, "args": None}
    assert torch.equal(extract_state_dict(ours)["w"], ema["w"])                  # EMA by default
    assert torch.equal(extract_state_dict(ours, "model")["w"], weights["w"])
    assert torch.equal(extract_state_dict({"module.w": torch.ones(2)})["w"], torch.ones(2))  # bare, DDP
    assert list(extract_state_dict({"_orig_mod.w": torch.ones(1)})) == ["w"]      # compiled
    with pytest.raises(JobError, match=r"no 'ema' weights \(weight sets present: model\)"):
        extract_state_dict({"model": weights, "args": None})


def official_state_dict(name):
    """Random tensors with exactly the official key names and shapes of `name`."""
    import json
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "data", "spec_keys", f"{name}.json")) as f:
        shapes = json.load(f)
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(*v, generator=generator) * 0.02 for k, v in shapes.items()}


def test_official_dic_s_checkpoint_loads_strictly_and_runs():
    state_dict = official_state_dict("DiC-S")
    model = create_model("DiC-S")
    load_model_weights(model, {"ema": state_dict}["ema"], "DiC-S")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key])
    out = model.eval()(torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.tensor([3]))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()


def test_wrong_variant_checkpoint_names_both_variants_in_one_line():
    state_dict = official_state_dict("DiC-B")
    assert identify_variant(state_dict, 32, 4, 1000) == "DiC-B"
    model = create_model("DiC-S")
    with pytest.raises(JobError) as info:
        load_model_weights(model, state_dict, "DiC-S")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("checkpoint holds DiC-B weights but the model is DiC-S: "
                       "pass --model DiC-B or a DiC-S checkpoint")


def test_checkpoint_of_another_size_or_family_is_described():
    dit = official_state_dict("DiT-S-2")
    model = create_model("DiC-S")
    with pytest.raises(JobError, match="checkpoint holds DiT-S/2 weights but the model is DiC-S"):
        load_model_weights(model, dit, "DiC-S")
    tiny = create_model("DiC-Tiny", num_classes=10).state_dict()
    tiny["x_embedder.proj.weight"] = torch.zeros(32, 3, 3, 3)        # a 3-channel checkpoint
    with pytest.raises(JobError, match=r"does not fit DiC-Tiny .*1 shape mismatches "
                                              r"\(e\.g\. x_embedder\.proj\.weight: checkpoint "
                                              r"\(32, 3, 3, 3\) vs model \(32, 4, 3, 3\)\)"):
        load_model_weights(create_model("DiC-Tiny", num_classes=10), tiny, "DiC-Tiny")


def test_atomic_write_keeps_the_extension_and_leaves_nothing_on_failure(tmp_path):
    from helpers.utils.files import atomic_write, atomic_write_text
    seen = []
    atomic_write(tmp_path / "a.npz", lambda tmp: seen.append(tmp) or open(tmp, "wb").write(b"x"))
    assert seen[0].endswith(".npz") and os.path.basename(seen[0]).startswith(".tmp-")
    assert (tmp_path / "a.npz").read_bytes() == b"x"

    def crash(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "b.json", crash)
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]                  # no b.json, no temp file
    atomic_write_text(tmp_path / "c.txt", "héllo\n")
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(FileExistsError, match="c.txt already exists"):
        atomic_write_text(tmp_path / "c.txt", "other")


def test_scripts_parse_official_overrides_and_reject_other_leftovers(capsys):
    import argparse
    from helpers.utils.models import parse_args_with_overrides
    parser = argparse.ArgumentParser(prog="train.py")
    parser.add_argument("--model", default="DiC-S")
    args, overrides = parse_args_with_overrides(parser, ["--model", "DiC-B", "--network_g__skip_stride=2"])
    assert args.model == "DiC-B" and overrides == {"skip_stride": 2}
    with pytest.raises(SystemExit) as info:
        parse_args_with_overrides(parser, ["--modle", "DiC-B"])
    assert info.value.code == 2
    assert "unrecognised argument '--modle'" in capsys.readouterr().err
