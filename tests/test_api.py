"""wrap()/unwrap(): clear errors that leave the model untouched, no trace after unwrap, configs and presets."""

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlprune
from vlprune.model_adapters.llava import LlavaAdapter
from vlprune.registry import selector_class
from vlprune.support import markdown

from reference import state
from tiny import batch, pixels, prompt, tiny_llava


def inputs(model):
    ids, mask = batch([prompt(model, 3, 4, images=1), prompt(model, 1, 2, images=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))


@pytest.fixture
def model():
    model = tiny_llava("sdpa")
    logits(model, inputs(model))  # transformers installs its own output-capturing hooks on the first forward
    return model


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


BAD = [
    (("nope",), {"keep": 4}, ValueError, r"unknown method 'nope'; available methods: \['dart', 'divprune'"),
    (("fastv",), {"keep": 0}, ValueError, "keep must be >= 1"),
    (("fastv",), {"keep": 2.5}, TypeError, "keep must be an int"),
    (("fastv",), {"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
    (("fastv",), {"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
    (("fastv",), {"keep": 4, "ratio": 0.5}, ValueError, "either keep= or ratio=, not both"),
    (("fastv",), {}, ValueError, "needs a budget"),
    (("random",), {"keep": 4, "layer": 4}, ValueError, "layer=4 is outside the language model's layers: use 0"),
    (("random",), {"keep": 4, "layer": -1}, ValueError, "layer must be >= 0"),
    (("fastv",), {"keep": 4, "layer": 0}, ValueError, "layer must be >= 1"),
    (("random",), {"keep": 4, "sead": 1}, TypeError, r"unknown parameter\(s\) \['sead'\]; its parameters are: \["),
    (("vtc_cls",), {"keep": 4}, ValueError, "vtc_cls sums vision layers"),
    (("fastv",), {"keep": 4, "positions": "shifted"}, ValueError, "positions must be one of"),
    (("fastv",), {"keep": 4, "per": "crop"}, ValueError, "per must be one of"),
    ((3,), {"keep": 4}, TypeError, "method must be a name, a path or a PruneConfig"),
]


@pytest.mark.parametrize("args,kwargs,error,message", BAD)
def test_bad_input_raises_and_leaves_model_untouched(model, args, kwargs, error, message):
    x = inputs(model)
    before, ref = state(model), logits(model, x)
    with pytest.raises(error, match=message):
        vlprune.wrap(model, *args, **kwargs)
    assert state(model) == before
    assert torch.equal(logits(model, x), ref)


def test_unsupported_model_type_lists_supported():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    supported = r"supported model types: \['internvl', 'llava'"
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'; " + supported):
        vlprune.wrap(LlamaForCausalLM(config), "random", keep=4)
    with pytest.raises(TypeError, match="must be a transformers model"):
        vlprune.wrap(object(), "random", keep=4)


def test_signal_the_model_cannot_give_names_model_and_method():
    siglip = tiny_llava("sdpa", vision="siglip")
    before = state(siglip)
    with pytest.raises(ValueError, match=r"'fastervlm' needs \[CLS\] attention.*siglip_vision_model\) has no \[CLS\]"):
        vlprune.wrap(siglip, "fastervlm", keep=4)
    assert state(siglip) == before
    # methods without [CLS] attention work on the same model
    ids, mask = batch([prompt(siglip, 2, 2)])
    with vlprune.wrap(siglip, "fastv", keep=3) as pruned, torch.no_grad():
        siglip(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))
    assert pruned.plans[0].kept_per_sample == [3]
    # the projector's input is there, but not the [CLS] state a request may ask for with it (VisionZip's)
    pruned.adapter.check_request(vlprune.signals.SignalRequest("vision_hidden"), "m")
    with pytest.raises(ValueError, match=r"method 'm' needs a vision tower with a \[CLS\] token"):
        pruned.adapter.check_request(vlprune.signals.SignalRequest("vision_hidden", cls=True), "m")


def test_wrapping_twice_is_an_error(model):
    handle = vlprune.wrap(model, "random", keep=4)
    before = state(model)
    with pytest.raises(ValueError, match="already wrapped"):
        vlprune.wrap(model, "fastv", keep=4)
    assert state(model) == before
    handle.unwrap()


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "random", "flowcut"])
def test_unwrap_leaves_no_trace(model, method):
    x = inputs(model)
    before, ref = state(model), logits(model, x)
    handle = vlprune.wrap(model, method, keep=3)
    assert state(model) != before  # hooks are in place
    assert not torch.equal(logits(model, x)[:, -1], ref[:, -1])
    handle.unwrap()
    handle.unwrap()  # idempotent
    assert state(model) == before and not handle.active
    assert torch.equal(logits(model, x), ref)

    with vlprune.wrap(model, method, keep=3):
        logits(model, x)
    assert state(model) == before
    assert torch.equal(logits(model, x), ref)

    with pytest.raises(RuntimeError, match="boom"):
        with vlprune.wrap(model, method, keep=3):
            logits(model, x)
            raise RuntimeError("boom")
    assert state(model) == before
    assert torch.equal(logits(model, x), ref)

    vlprune.wrap(model, method, keep=3)
    assert vlprune.unwrap(model) is True
    assert vlprune.unwrap(model) is False
    assert state(model) == before


def test_scoring_attention_is_switched_only_where_needed_and_restored(model):
    with vlprune.wrap(model, "fastv", keep=3):
        assert model.config.text_config._attn_implementation == "vlprune_sdpa"
        assert model.config.vision_config._attn_implementation == "sdpa"
    with vlprune.wrap(model, "fastervlm", keep=3):
        assert model.config.text_config._attn_implementation == "sdpa"
        assert model.config.vision_config._attn_implementation == "vlprune_sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_failed_install_leaves_nothing(model, monkeypatch):
    before = state(model)

    def broken(self, requests, store, hooks):
        raise RuntimeError("install failed")

    monkeypatch.setattr(LlavaAdapter, "install_vision", broken)
    with pytest.raises(RuntimeError, match="install failed"):
        vlprune.wrap(model, "fastv", keep=3)
    assert state(model) == before


def test_presets_and_yaml(model, tmp_path):
    config = vlprune.load_config("fastv-64")
    assert (config.name, config.stages[0].method, config.stages[0].keep, config.stages[0].layer) == (
        "fastv-64",
        "fastv",
        64,
        2,
    )
    assert {"fastv-64", "fastv-128", "fastv-192"} <= set(vlprune.preset_names())
    with vlprune.wrap(model, "fastv-64", keep=5) as pruned, torch.no_grad():
        model(**inputs(model))
    assert pruned.plans[0].kept_per_sample == [5, 10] and pruned.plans[0].layer == 2

    path = tmp_path / "mine.yaml"
    path.write_text("stages:\n  - {method: uniform, ratio: 0.25, layer: 1}\npositions: renumber\n")
    loaded = vlprune.load_config(path)
    assert loaded.name == "mine" and loaded.positions == "renumber" and loaded.stages[0].ratio == 0.25
    with vlprune.wrap(model, str(path)) as pruned, torch.no_grad():
        model(**inputs(model))
    assert pruned.plans[0].kept_per_sample == [4, 8]

    path.write_text("stages:\n  - {method: uniform, keep: 4, budget: 3}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['budget'\] in stage"):
        vlprune.load_config(path)
    with pytest.raises(ValueError, match="unknown preset 'fastv-7'"):
        vlprune.load_config("fastv-7")
    two = vlprune.PruneConfig([vlprune.Stage("random", keep=8), vlprune.Stage("fastv", keep=4, layer=2)])
    with pytest.raises(ValueError, match="override a single-stage method"):
        vlprune.wrap(model, two, keep=3)
    bad_order = vlprune.PruneConfig([vlprune.Stage("fastv", keep=8, layer=2), vlprune.Stage("random", keep=4)])
    with pytest.raises(ValueError, match="strictly increasing"):
        vlprune.wrap(model, bad_order)


def test_registries():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("| method | registry name |", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"^\| [^|]+ \| `([a-z0-9_]+)` \|", table, flags=re.M)
    assert sorted(names) == vlprune.list_methods() and len(names) == len(set(names))
    for name in names:  # every registered method has a docstring and a paper (or baseline) line
        cls = selector_class(name)
        assert cls.__doc__ and cls.summary
    models = readme.split("| `model_type` | classes | signals |", 1)[1].split("\n\n", 1)[0]
    assert sorted(re.findall(r"^\| `([a-z0-9_]+)` \|", models, flags=re.M)) == vlprune.list_models()
    methods_page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    detailed = methods_page.split("| method | registry name |", 1)[1].split("\n\n", 1)[0]
    assert sorted(re.findall(r"^\| [^|]+ \| `([a-z0-9_]+)` \|", detailed, flags=re.M)) == vlprune.list_methods()
    assert markdown() in methods_page  # the support table is the generated one
    with pytest.raises(ValueError, match="lower snake case"):
        vlprune.register_selector("Bad-Name")
    with pytest.raises(ValueError, match="already registered"):
        vlprune.register_selector("fastv")(type("Other", (), {}))


def test_precomputed_image_features_are_refused_for_vision_signals(model):
    x = inputs(model)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=x.pop("pixel_values"), return_dict=True)
    with vlprune.wrap(model, "fastervlm", keep=3), torch.no_grad():
        with pytest.raises(ValueError, match=r"no \['cls_attention'\] signal was captured"):
            model(**x, mm_encoder_outputs={"image": features})
    with vlprune.wrap(model, "fastv", keep=3) as pruned, torch.no_grad():  # decoder signals need no vision hooks
        model(**x, mm_encoder_outputs={"image": features})
    assert pruned.plans[0].kept_per_sample == [3, 6]


def test_no_input_is_left_to_the_model(model):
    with vlprune.wrap(model, "random", keep=3), pytest.raises(ValueError, match="exactly one of input_ids"):
        model()


def test_methods_by_input_kind():
    image, video = vlprune.list_methods("image"), vlprune.list_methods("video")
    assert (
        video == ["dycoke", "fastvid", "holitom", "prunevid", "query_frames"]
        and sorted(image + video) == vlprune.list_methods()
    )
    assert all(vlprune.registry.selector_class(m).video for m in video)
    with pytest.raises(ValueError, match="inputs must be None, 'image' or 'video', got 'audio'"):
        vlprune.list_methods("audio")


def test_a_broken_or_missing_yaml_preset_names_the_file(model, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages: [ {method: uniform, keep: 4\n")
    before = state(model)
    for target in (path, str(path)):
        with pytest.raises(ValueError, match=r"config .*broken.yaml' is not valid YAML"):
            vlprune.wrap(model, target) if isinstance(target, str) else vlprune.load_config(target)
    with pytest.raises(ValueError, match=r"config file '.*missing.yaml' does not exist"):
        vlprune.wrap(model, str(tmp_path / "missing.yaml"))
    assert state(model) == before
