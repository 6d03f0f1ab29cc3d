"""load_wan on broken files names the file; device="cuda" without CUDA is a clear error (issue 12)."""

import json

import pytest
import torch
from _wan_helpers import save_wan_folder, wan_config_dict

from tokentrim.model import WanConfig, WanModel, load_wan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny")
    path = tmp_path_factory.mktemp("wan") / "good"
    save_wan_folder(WanModel(cfg).state_dict(), wan_config_dict(cfg), str(path))
    return path


def _copy(folder, tmp_path):
    dst = tmp_path / "wan"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("cut", ["empty", "header", "half", "last_byte"])
def test_truncated_or_empty_safetensors_names_the_file(folder, tmp_path, cut):
    dst = _copy(folder, tmp_path)
    weights = dst / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    keep = {"empty": 0, "header": 5, "half": len(data) // 2, "last_byte": len(data) - 1}[cut]
    weights.write_bytes(data[:keep])
    for target in (dst, weights):
        with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: cannot read it as safetensors") as e:
            load_wan(target, device="cpu")
        assert ("(empty;" in str(e.value)) == (cut == "empty")


@pytest.mark.parametrize("text,message", [
    ('{"dim": 128, ', "not a valid JSON config file"),
    ("", "not a valid JSON config file"),
    ("[1]", "expected a JSON object"),
    ('{"dim": "wide"}', "not a usable Wan config"),
])
def test_malformed_config_json_names_the_file(folder, tmp_path, text, message):
    dst = _copy(folder, tmp_path)
    (dst / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_wan(dst, device="cpu")
    assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match=message):
        load_wan(dst / "diffusion_pytorch_model.safetensors", device="cpu")
    with pytest.raises(ValueError, match=message):
        WanConfig.resolve(str(dst / "config.json"))


def test_cuda_without_cuda_is_a_clear_error(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"load_wan\(device='cuda'\): CUDA is not available.*device='cpu'"):
        load_wan(folder, device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:1'"):
        load_wan(folder, device=torch.device("cuda", 1))
    assert load_wan(folder, device="cpu").config == WanConfig.preset("tiny")


def test_good_folder_still_loads(folder):
    json.loads((folder / "config.json").read_text())
    assert isinstance(load_wan(folder, device="cpu"), WanModel)
