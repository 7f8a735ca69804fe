"""The zoo: traced models compute what the original modules compute; weights load
from the bundled package, files and object storage, and bad files are refused."""

import io
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save as st_save
from sklearn.datasets import load_sample_image

import surgery
from freezeray.images import resize_crop
from pipeline.decode import normalize
from surgery.vgg import VGG16

ZOO = ["vgg16", "efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0"]


def _eager(name: str) -> torch.nn.Module:
    if name == "vgg16":
        return VGG16()
    if name == "efficientnet_lite0":
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_rate=0.0)
    return torchvision.models.get_model(name, weights=None)


@pytest.mark.parametrize("name", ZOO)
def test_traced_zoo_model_gives_the_original_activations(name):
    torch.manual_seed(0)
    model = surgery.zoo.load(name)
    eager = _eager(name)
    eager.load_state_dict(model.state_dict())
    eager.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))
    names = surgery.vertex_names(model)
    assert names[0] == "x" and len(names) == len(set(names))
    info = surgery.get_info(model)
    assert info.name == name and len(info.losses) == 1


def test_vgg16_has_dl4j_vertex_names(vgg16_random):
    names = set(surgery.vertex_names(vgg16_random))
    expected = {f"block{b}_conv{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)}
    expected |= {f"block{b}_pool" for b in range(1, 6)} | {"flatten", "fc1", "fc2", "predictions"}
    assert expected <= names
    assert surgery.get_info(vgg16_random).losses == {"predictions": "nll"}


def test_efficientnet_lite0_keeps_timm_names(lite0_imagenet):
    names = set(surgery.vertex_names(lite0_imagenet))
    assert {"conv_stem", "blocks.0", "blocks.6", "conv_head", "global_pool", "classifier"} <= names
    pre = surgery.get_info(lite0_imagenet).preprocessing
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic" and pre.crop_pct == 0.875 and pre.resize_size == 256


@pytest.mark.parametrize("photo, expected", [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_bundled_imagenet_weights_recognise_the_sample_photos(lite0_imagenet, photo, expected):
    from PIL import Image

    pre = surgery.get_info(lite0_imagenet).preprocessing
    pixels = resize_crop(Image.fromarray(load_sample_image(photo)), pre)
    x = normalize(torch.from_numpy(pixels)[None], pre)
    with torch.no_grad():
        top = lite0_imagenet(x).argmax(1).item()
    assert surgery.get_info(lite0_imagenet).classes[top] == expected


def test_vgg16_accepts_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / "vgg16-torchvision.pth"
    torch.save(tv.state_dict(), path)
    ours = surgery.zoo.load("vgg16", weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x).softmax(1))


def test_weights_load_from_object_storage(s3_server, s3_bucket, storage_options):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    s3_server.filesystem().pipe(f"{s3_bucket}/r18.safetensors", st_save(source.state_dict()))
    model = surgery.zoo.load("resnet18", weights=f"s3://{s3_bucket}/r18.safetensors", storage_options=storage_options)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "r34.safetensors"
    path.write_bytes(st_save(torchvision.models.resnet34(weights=None).state_dict()))
    with pytest.raises(surgery.WeightsError, match=r"do not fit .*unexpected tensors"):
        surgery.zoo.load("resnet18", weights=str(path))
    path2 = tmp_path / "wide.pth"
    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    torch.save(state, path2)
    with pytest.raises(surgery.WeightsError, match=r"fc.weight: file \(7, 512\) vs model \(1000, 512\)"):
        surgery.zoo.load("resnet18", weights=str(path2))


class _NotWeights:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"fc.weight": torch.zeros(1), "payload": _NotWeights()}, f)
    with pytest.raises(surgery.WeightsError, match="not a weights-only file"):
        surgery.zoo.load("resnet18", weights=str(path))
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(surgery.WeightsError):
        surgery.zoo.load("resnet18", weights=str(raw))


def test_unknown_zoo_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown zoo model 'resnet_18'.*Closest: .*resnet18"):
        surgery.zoo.load("resnet_18")


def test_duplicate_registration_is_an_error(tiny_name):
    with pytest.raises(ValueError, match="already registered"):
        surgery.zoo.register_model(tiny_name)(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        surgery.zoo.register_model("resnet18")(lambda: None)


def test_preprocessing_resizes_shorter_side_then_centre_crops():
    from PIL import Image

    pre = surgery.PreprocessConfig(input_size=(3, 8, 8), crop_pct=0.5, interpolation="nearest")
    img = Image.fromarray(np.arange(32 * 64 * 3, dtype=np.uint8).reshape(32, 64, 3))
    out = resize_crop(img, pre)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    resized = np.asarray(img.resize((32, 16), Image.NEAREST))
    np.testing.assert_array_equal(out, resized[4:12, 12:20])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        surgery.PreprocessConfig(interpolation="cubic")


def test_torch_file_with_state_dict_wrapper_loads(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save({"state_dict": source.state_dict(), "epoch": torch.tensor(3)}, buf)
    (tmp_path / "ckpt.pth").write_bytes(buf.getvalue())
    model = surgery.zoo.load("resnet18", weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(model.state_dict()["fc.weight"], source.state_dict()["fc.weight"])


@pytest.mark.parametrize("arch,mode", [("dm_nfnet_f0", "squash"), ("deepseek_vit_412m", "border"), ("resnet18", "center")])
def test_timm_architectures_preprocess_as_timm_does(arch, mode):
    """Issue 21, defect 7: ``timm/<arch>`` takes timm's data config, crop mode included, and
    an image preprocessed by freezeray equals timm's own eval transform of it."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from freezeray.images import preprocess_bytes

    config = surgery.get_info(surgery.zoo.skeleton(f"timm/{arch}")).preprocessing
    timm_config = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(arch).to_dict())
    assert config.crop_mode == mode == timm_config["crop_mode"]
    assert (config.input_size, config.crop_pct, config.interpolation) == \
        (tuple(timm_config["input_size"]), timm_config["crop_pct"], timm_config["interpolation"])
    transform = create_transform(**timm_config)
    rng = np.random.default_rng(0)
    for shape in ((300, 451), (451, 300)):  # landscape and portrait: squash distorts, border pads left-right or top-bottom
        image = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        data = io.BytesIO()
        image.save(data, format="PNG")
        ours = normalize(torch.from_numpy(preprocess_bytes(data.getvalue(), config))[None], config)[0]
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-6)
