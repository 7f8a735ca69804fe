"""Bring your own model: any nn.Module (from_module), ONNX files (import_onnx), timm
architectures with a weights file, torchvision weights by enum name, and DL4J's
sequential (index-based) builder on chain models."""

import warnings

import numpy as np
import pytest
import torch
from imagesets import write_folder
from PIL import Image
from torch import nn

import surgery
from jobs.demo import write_digits
from pipeline import Run, Stopping, evaluate, featurize, fit_head
from surgery import FineTuneConfiguration, TransferLearning
from surgery.graph import VertexError
from surgery.layers import Dense, Output
from surgery.modules import TraceFailure
from surgery.onnx_import import UnsupportedOnnx
from surgery.weights import WeightsError


class HandWritten(nn.Module):
    """A small CNN written by hand (not in any zoo), with a functional relu between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(torch.relu(self.bn(self.conv(x))))))


def _hand_written():
    torch.manual_seed(0)
    return HandWritten(), "flatten", "fc", 16


def _torchvision_resnet():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=10), "flatten", "fc", 32


@pytest.mark.parametrize("make", [_hand_written, pytest.param(_torchvision_resnet, marks=pytest.mark.slow)],
                         ids=["hand_written", "torchvision_resnet18"])
def test_from_module_goes_through_builder_featurize_fit_save_load_evaluate(ray_session, tmp_path, make):
    module, boundary, classifier, size = make()
    base = surgery.from_module(module, preprocessing={"input_size": (3, size, size), "crop_pct": 1.0})
    assert surgery.get_info(base).origin == "module"
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(base(x), module.eval()(x), atol=1e-6)  # the same function, weights kept
    model = (TransferLearning(base).fine_tune_configuration(FineTuneConfiguration(lr=0.01, seed=3))
             .set_feature_extractor(boundary).remove_vertex_keep_connections(classifier)
             .add_layer(classifier, Output(3, loss="cross_entropy")).build())
    write_folder(tmp_path / "train", per_class=12, size=size, seed=1, odd_modes=False)
    write_folder(tmp_path / "val", per_class=6, size=size, seed=2, odd_modes=False)
    train = featurize(model, str(tmp_path / "train"), str(tmp_path / "f-train"), dtype="float32")
    val = featurize(model, str(tmp_path / "val"), str(tmp_path / "f-val"), dtype="float32")
    assert (train.rows, val.rows, train.errors) == (36, 18, 0)
    result = fit_head(model, train, validation=val, stopping=Stopping(epochs=30),
                      run=Run(storage=str(tmp_path / "runs")))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses  # it trains

    surgery.save(result.model, str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=type(module).__name__):  # code is never imported from a recipe
        surgery.load(str(tmp_path / "saved"))
    fresh = make()[0]
    loaded = surgery.load(str(tmp_path / "saved"), base=fresh)
    assert surgery.fingerprint(loaded) == surgery.fingerprint(result.model)
    before, after = evaluate(result.model, val), evaluate(loaded, val)
    assert (after.accuracy, after.loss) == pytest.approx((before.accuracy, before.loss), abs=1e-6)
    images = evaluate(loaded, str(tmp_path / "val"))  # the whole loaded model, on images
    assert images.accuracy == pytest.approx(before.accuracy, abs=1 / 18 + 1e-9)  # float16-free, so at most one flip


def test_a_sequential_of_described_layers_saves_as_data(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = surgery.from_module(net, preprocessing={"input_size": (3, 8, 8)})
    surgery.save(model, str(tmp_path / "m"))
    loaded = surgery.load(str(tmp_path / "m"))  # no base= needed: the recipe describes every layer
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_untraceable_module_names_the_submodule_and_the_fix():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    net = nn.Sequential(nn.Conv2d(3, 4, 3), Gate(), nn.Flatten())
    with pytest.raises(TraceFailure, match=r"submodule '1' \(Gate\).*leaves=\[Gate\]"):
        surgery.from_module(net, preprocessing={"input_size": (3, 8, 8)})
    model = surgery.from_module(net, preprocessing={"input_size": (3, 8, 8)}, leaves=[Gate])  # the fix works
    assert "1" in surgery.vertex_names(model)


# -- ONNX ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory, lite0_imagenet):
    """efficientnet_lite0 exported with torch.onnx.export's defaults (opset 20, constant
    folding on), as users bring files."""
    path = tmp_path_factory.mktemp("onnx") / "lite0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lite0_imagenet.eval(), torch.randn(1, 3, 224, 224), str(path), dynamo=False)
    return path


def _real_images(config) -> torch.Tensor:
    """The two scikit-learn sample photos and four digits, preprocessed for the model."""
    from sklearn.datasets import load_digits, load_sample_images

    from freezeray.images import resize_crop
    from pipeline.decode import normalize

    pictures = [Image.fromarray(img) for img in load_sample_images().images]
    digits = load_digits()
    pictures += [Image.fromarray((255 - digits.images[i] / 16 * 255).astype(np.uint8)).convert("RGB") for i in range(4)]
    return normalize(torch.from_numpy(np.stack([resize_crop(p, config) for p in pictures])), config)


def test_onnx_import_matches_the_original_on_real_images(lite0_onnx, lite0_imagenet):
    with pytest.warns(UserWarning, match="no preprocessing"):
        imported = surgery.zoo.load("onnx", weights=str(lite0_onnx))
    info = surgery.get_info(imported)
    assert info.origin == "onnx" and info.preprocessing.input_size == (3, 224, 224)
    names = surgery.vertex_names(imported)
    assert {"conv_stem/Conv", "flatten/Flatten", "classifier/Gemm"} <= set(names)  # the ONNX node names
    x = _real_images(surgery.get_info(lite0_imagenet).preprocessing)
    with torch.no_grad():
        want, got = lite0_imagenet.eval()(x), imported(x)
    assert (got - want).abs().max().item() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.slow
def test_onnx_model_frozen_at_a_named_node_featurizes_and_trains(ray_session, lite0_onnx, lite0_imagenet, tmp_path):
    config = surgery.get_info(lite0_imagenet).preprocessing
    base = surgery.import_onnx(str(lite0_onnx), preprocessing=config)
    torch.manual_seed(0)
    model = (TransferLearning(base).set_feature_extractor("flatten/Flatten")
             .remove_vertex_and_connections("classifier/Gemm")
             .add_layer("head", Output(10, loss="cross_entropy"), "flatten/Flatten").set_outputs("head").build())
    assert surgery.summary(model).trainable_params == 1280 * 10 + 10
    write_digits(str(tmp_path / "digits"), per_class=12)
    train = featurize(model, str(tmp_path / "digits" / "train"), str(tmp_path / "f-train"))
    test = featurize(model, str(tmp_path / "digits" / "test"), str(tmp_path / "f-test"))
    assert (train.rows, test.rows, train.errors) == (90, 30, 0)
    assert train.to_tensors()[0].shape == (90, 1280)
    result = fit_head(model, train, run=Run(storage=str(tmp_path / "runs")))
    accuracy = evaluate(result.model, test).accuracy
    assert accuracy >= 0.6, accuracy  # ImageNet features of digits; chance is 0.1

    surgery.save(result.model, str(tmp_path / "saved"))  # the ONNX graph is copied into the folder
    lite0_onnx_copy = tmp_path / "saved" / "base.onnx"
    assert lite0_onnx_copy.read_bytes() == lite0_onnx.read_bytes()
    loaded = surgery.load(str(tmp_path / "saved"))
    assert evaluate(loaded, test).accuracy == pytest.approx(accuracy)


def test_onnx_from_object_storage_with_preprocessing_in_its_metadata(lite0_onnx, s3_bucket, storage_options):
    import json

    import onnx

    from freezeray import storage
    from surgery.onnx_import import PREPROCESSING_KEY

    proto = onnx.load(str(lite0_onnx))
    wanted = {"input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
              "std": [0.5, 0.5, 0.5]}
    onnx.helper.set_model_props(proto, {PREPROCESSING_KEY: json.dumps(wanted)})
    uri = f"s3://{s3_bucket}/keras/lite0.onnx"
    storage.write_bytes(uri, proto.SerializeToString(), storage_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = surgery.import_onnx(uri, storage_options=storage_options)
    assert not [w for w in caught if "preprocessing" in str(w.message)]  # the file says how: no warning
    config = surgery.get_info(model).preprocessing
    assert (config.crop_pct, config.interpolation, tuple(config.mean)) == (0.9, "bicubic", (0.5, 0.5, 0.5))


def test_onnx_with_an_unsupported_operator_names_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Det", ["x"], ["y"], name="determinant")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOnnx, match=r"Det \(opset 17\)"):
        surgery.import_onnx(str(path), preprocessing={"input_size": (3, 3, 3)})
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        surgery.import_onnx(str(tmp_path / "junk.onnx"), preprocessing={"input_size": (3, 3, 3)})


# -- timm and torchvision by name ------------------------------------------------------------
def test_timm_architecture_with_a_weights_file_and_new_num_classes(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    with pytest.warns(UserWarning, match=r"left out the classifier's fc\.weight, fc\.bias"):
        model = surgery.zoo.load("timm/resnet18", weights=str(tmp_path / "resnet18.safetensors"), num_classes=5)
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (5, 512)
    kept = [k for k in state if not k.startswith("fc.")]
    assert kept and all(torch.equal(loaded[k], state[k]) for k in kept)  # every other tensor came from the file
    assert surgery.get_info(model).preprocessing.input_size == (3, 224, 224)  # timm's pretrained config

    with pytest.raises(ValueError, match="resnet18"):  # a typo gets timm's close names
        surgery.zoo.load("timm/resnet81")
    with pytest.raises(WeightsError, match="Hugging Face"):  # never downloaded at run time
        surgery.zoo.load("timm/resnet18", weights="imagenet")


def test_torchvision_weights_by_enum_name_are_checked_without_downloading():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        surgery.zoo.load("resnet18", weights="IMAGENET9K_V9")


# -- DL4J's sequential builder ----------------------------------------------------------------
def _mln():
    """A MultiLayerNetwork-like chain: layers 0-5 (conv, relu, pool, flatten, dense, output)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 16),
                        nn.Linear(16, 10))
    return surgery.from_module(net, preprocessing={"input_size": (3, 10, 10)})


def test_summary_numbers_the_layers_of_a_chain():
    rows = surgery.summary(_mln()).rows
    assert [(r.index, r.vertex) for r in rows if r.index is not None] == [(i, str(i)) for i in range(6)]
    assert " index " in f" {str(surgery.summary(_mln())).splitlines()[2]} "


def test_dl4j_mln_examples_by_index():
    # DL4J: new TransferLearning.Builder(net).setFeatureExtractor(4).nOutReplace(5, 5, XAVIER).build()
    model = TransferLearning(_mln()).set_feature_extractor(4).n_out_replace(5, 5).build()
    s = surgery.summary(model)
    assert s.trainable_params == 16 * 5 + 5  # only the replaced output layer trains
    assert s.frozen_params == (3 * 6 * 9 + 6) + (24 * 16 + 16)
    # DL4J: .setFeatureExtractor(1).nInReplace(4, 24)... and an index past the end is named
    with pytest.raises(VertexError, match="6 layers"):
        TransferLearning(_mln()).set_feature_extractor(6)
    # DL4J: removeOutputLayer().addLayer(new OutputLayer(...nOut(3)))
    model = TransferLearning(_mln()).set_feature_extractor(3).remove_output_layer().add_layer(Output(3)).build()
    assert surgery.summary(model).trainable_params == (24 * 16 + 16) + (16 * 3 + 3)
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, 3)


def test_remove_layers_from_output_and_add_layer_build_what_named_ops_build():
    torch.manual_seed(5)
    by_index = (TransferLearning(_mln()).set_feature_extractor(2).remove_layers_from_output(2)
                .add_layer(Dense(32, activation="relu")).add_layer(Output(4)))
    torch.manual_seed(5)
    by_name = (TransferLearning(_mln()).set_feature_extractor("2").remove_vertex_and_connections("4")
               .add_layer("4", Dense(32, activation="relu"), "3").add_layer("5", Output(4), "4").set_outputs("5"))
    torch.manual_seed(7)
    a = by_index.build()
    torch.manual_seed(7)
    b = by_name.build()
    assert surgery.vertex_names(a) == surgery.vertex_names(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert surgery.fingerprint(a) == surgery.fingerprint(b)
    # mixing names and indices
    mixed = TransferLearning(_mln()).set_feature_extractor(2).n_out_replace("4", 8).build()
    assert surgery.summary(mixed).trainable_params == (24 * 8 + 8) + (8 * 10 + 10)


def test_indices_on_a_graph_that_is_not_a_chain_say_to_use_names(lite0_imagenet):
    with pytest.raises(VertexError, match="not a chain.*vertex names"):
        TransferLearning(lite0_imagenet).set_feature_extractor(3)


def test_a_run_config_with_an_onnx_base_is_checked_against_its_node_names(lite0_onnx, tmp_path, capsys):
    import yaml

    from jobs.cli import main

    write_folder(tmp_path / "images", per_class=3, size=24, seed=1, odd_modes=False)
    config = {"model": {"base": "onnx", "weights": str(lite0_onnx), "kwargs": {"preprocessing": {"input_size": [3, 224, 224]}}},
              "surgery": [{"set_feature_extractor": "flatten/Flatten"}, {"remove_vertex_and_connections": "classifier/Gemm"},
                          {"add_layer": {"name": "head", "layer": {"type": "Output", "n_out": 3}, "inputs": ["flatten/Flatten"]}},
                          {"set_outputs": ["head"]}],
              "data": {"train": str(tmp_path / "images")}, "featurize": {"output": str(tmp_path / "f")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    config["surgery"][0] = {"set_feature_extractor": "flatten/Flaten"}
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 2
    assert "surgery[0].set_feature_extractor: vertex 'flatten/Flaten' is not in" in capsys.readouterr().err
