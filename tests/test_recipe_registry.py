"""Recipes (typed, base inheritance, overrides, one-line errors) and registries (names, aliases, plug-ins)."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types

import pytest

from mmkit.recipe import Recipe, RecipeError, load_recipe
from mmkit.registry import Registry, UnknownNameError, connectors, encoders, llms


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- recipes


def test_typed_load_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", """
        name: base
        model:
          vision: {name: clip, feature_layer: -2}
          llm: {name: llama, config: {hidden_size: 32}}
        stages:
          - {name: s1, lr: {connector: 1.0e-3}, global_batch_size: 8}
          - {name: s2, trainable: {llm: full}, lr: {llm: 2.0e-5}}
    """)
    child = write(tmp_path, "child.yaml", """
        base: base.yaml
        name: child
        model:
          llm: {config: {num_hidden_layers: 2}}
    """)
    r = load_recipe(child, ["stages[1].global_batch_size=16", "model.vision.feature_layer=-1", "train.bf16=true"])
    assert isinstance(r, Recipe)
    assert r.name == "child"
    assert r.model.llm.config == {"hidden_size": 32, "num_hidden_layers": 2}  # deep-merged with the base
    assert r.model.vision.feature_layer == -1
    assert r.stages[1].global_batch_size == 16 and r.stages[0].global_batch_size == 8
    assert r.stages[0].lr.as_dict() == {"connector": 1e-3}
    assert r.train.bf16 is True


def test_yaml_string_numbers_become_floats(tmp_path):
    path = write(tmp_path, "r.yaml", "stages:\n  - {warmup_ratio: 3e-2}\n")
    assert load_recipe(path).stages[0].warmup_ratio == pytest.approx(0.03)


def test_misspelled_key_names_path_and_suggestion(tmp_path):
    path = write(tmp_path, "r.yaml", "model:\n  conector: {name: linear}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "model.conector: unknown key; did you mean 'connector'?" in msg
    assert str(path) in msg and "\n" not in msg


def test_wrong_type_names_the_key_path(tmp_path):
    path = write(tmp_path, "r.yaml", "stages:\n  - {name: a}\n  - {name: b, warmup_ratio: fast}\n")
    with pytest.raises(RecipeError, match=r"stages\[1\]\.warmup_ratio: expected a number, got 'fast'"):
        load_recipe(path)


def test_bad_literal_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"model.image.aspect_ratio: expected one of .*got 'padd'; did you mean 'pad'"):
        load_recipe({"model": {"image": {"aspect_ratio": "padd"}}})


def test_override_errors():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe({}, ["train.bf16"])
    with pytest.raises(RecipeError, match="index 3 is out of range"):
        load_recipe({"stages": [{}]}, ["stages[3].epochs=2"])
    with pytest.raises(RecipeError, match=r"train.sed: unknown key; did you mean 'seed'"):
        load_recipe({}, ["train.sed=3"])


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe("recipes/llava15.yaml")
    path = tmp_path / "resolved.yaml"
    r.save(path)
    assert load_recipe(path) == r


def test_shipped_recipes_parse():
    for name in ("tiny", "llava15"):
        r = load_recipe(f"recipes/{name}.yaml")
        assert r.stages, name
    r = load_recipe("recipes/llava15.yaml")
    assert r.model.vision.pretrained == "openai/clip-vit-large-patch14-336"
    assert r.model.llm.pretrained == "lmsys/vicuna-7b-v1.5"
    assert [s.lr.as_dict() for s in r.stages] == [{"connector": 1e-3}, {"connector": 2e-5, "llm": 2e-5}]
    assert [s.global_batch_size for s in r.stages] == [256, 128]


# ---------------------------------------------------------------- registries


def test_builtin_names():
    assert {"clip", "siglip", "open_clip", "timm"} <= set(encoders.names())
    assert {"identity", "linear", "mlp2x_gelu"} <= set(connectors.names())
    assert {"llama", "mistral", "qwen2", "auto"} <= set(llms.names())
    assert llms.get("vicuna") is llms.get("llama")  # explicit alias


def test_unknown_name_lists_choices_and_closest():
    with pytest.raises(UnknownNameError) as err:
        encoders.get("clipp")
    msg = str(err.value)
    assert msg.startswith("unknown encoder 'clipp'; did you mean 'clip'?")
    assert "siglip" in msg and "timm" in msg


def test_unknown_encoder_in_recipe_is_one_line():
    import mmkit

    with pytest.raises(RecipeError) as err:
        mmkit.build({"model": {"vision": {"name": "sigclip"}}})
    msg = str(err.value)
    assert "model.vision.name: unknown encoder 'sigclip'; did you mean 'siglip'?" in msg and "\n" not in msg


def test_exact_keys_no_substring_dispatch():
    reg = Registry("thing")
    reg.register("clip-large", obj=object())
    with pytest.raises(UnknownNameError):
        reg.get("clip")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("clip-large", obj=object())


def test_entry_point_plugins(monkeypatch):
    module = types.ModuleType("fake_mmkit_plugin")

    def build_fancy(cfg):
        return "fancy"

    module.build_fancy = build_fancy
    monkeypatch.setitem(sys.modules, "fake_mmkit_plugin", module)
    ep = importlib.metadata.EntryPoint(name="fancy", value="fake_mmkit_plugin:build_fancy", group="mmkit.encoders")
    broken = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz:f", group="mmkit.encoders")

    def fake_entry_points(group=None, **kw):
        return [ep, broken] if group == "mmkit.encoders" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg = Registry("encoder", "mmkit.encoders")
    assert reg.get("fancy") is build_fancy  # a broken plug-in is logged, not fatal
    assert "broken" not in reg.names()


# ---------------------------------------------------------------- typed stages


@pytest.mark.parametrize("override,message", [
    ("stages[0].trainable.visoin=full", "stages[0].trainable.visoin: unknown key; did you mean 'vision'?"),
    ("stages[0].trainable.llm=fulll", "stages[0].trainable.llm: expected one of 'frozen', 'full', 'lora', 'qlora', "
                                      "got 'fulll'; did you mean 'full'?"),
    ("stages[0].trainable.vision=lora", "stages[0].trainable.vision: lora is supported for the llm only"),
    ("stages[0].trainable={llm: full}", "stages[0].lr.llm: missing learning rate for a trainable part"),
    ("stages[0].lr.llm=fast", "stages[0].lr.llm: expected a number or null, got 'fast'"),
    ("stages[0].lr.connector=-1", "stages[0].lr.connector: expected a positive number, got -1.0"),
    ("stages[0].per_device_batch_size=0", "stages[0].per_device_batch_size: expected a positive integer, got 0"),
    ("stages[0].global_batch_size=-8", "stages[0].global_batch_size: expected a positive integer, got -8"),
    ("stages[0].max_steps=0", "stages[0].max_steps: expected a positive integer (or null for epochs), got 0"),
    ("stages[0].warmup_ratio=-1", "stages[0].warmup_ratio: expected a number in [0, 1), got -1.0"),
    ("stages[0].global_batch_size=6", "stages[0]: global_batch_size 6 is not a multiple of per_device_batch_size 4"),
])
def test_stage_fields_are_typed_and_checked_at_load(tmp_path, override, message):
    path = write(tmp_path, "r.yaml", "stages:\n  - {per_device_batch_size: 4, global_batch_size: 8}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert str(err.value) == f"{path}: {message}"


def test_stage_defaults_and_lr_strings(tmp_path):
    path = write(tmp_path, "r.yaml", "stages:\n  - {trainable: {llm: full}, lr: {llm: 1e-3}}\n  - {}\n")
    a, b = load_recipe(path).stages
    assert (a.trainable.vision, a.trainable.connector, a.trainable.llm) == ("frozen", "frozen", "full")
    assert a.lr.as_dict() == {"llm": 1e-3}  # YAML reads 1e-3 as a string: converted, not rejected
    assert b.trainable.connector == "full" and b.lr.as_dict() == {"connector": 1e-3}


def test_retired_keys_still_load_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, "r.yaml", "demo: {train_images: 8}\nstages:\n  - {}\n")
    with caplog.at_level("WARNING", logger="mmkit.recipe"):
        load_recipe(path)
    assert "demo={'train_images': 8} is ignored" in caplog.text and "plugins.shapes_demo" in caplog.text


def test_num_workers_is_a_field_again_not_a_retired_key(tmp_path, caplog):
    path = write(tmp_path, "r.yaml", "data: {num_workers: 4}\nstages:\n  - {data: {num_workers: 2}}\n")
    with caplog.at_level("WARNING", logger="mmkit.recipe"):
        recipe = load_recipe(path)
    assert recipe.data.num_workers == 4 and recipe.stages[0].data.num_workers == 2
    assert "is ignored" not in caplog.text


def test_build_never_changes_the_callers_recipe():
    import mmkit

    recipe = load_recipe("recipes/tiny.yaml")
    before = recipe.to_dict()
    model = mmkit.build(recipe)
    assert recipe.to_dict() == before
    assert model.recipe is not recipe and model.recipe.model.image_token_id == model.image_token_id


# ---------------------------------------------------------------- plug-ins in recipes


def test_unknown_plugin_is_one_line_with_the_closest_name():
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/tiny.yaml", ["plugins.shpes.train_images=3"])
    msg = str(err.value)
    assert "plugins.shpes: unknown plugin 'shpes'; did you mean 'shapes_demo'? choices: " in msg
    assert "shapes_demo" in msg.split("choices: ")[1] and "\n" not in msg
    with pytest.raises(RecipeError, match=r"plugins: expected a mapping of plug-in name to options, got \[1\]"):
        load_recipe({"plugins": [1]})


def test_plugin_options_are_typed_like_the_rest_of_the_recipe():
    with pytest.raises(RecipeError, match=r"recipes/tiny.yaml: plugins.shapes_demo.train_imges: unknown key; "
                                          r"did you mean 'train_images'\?"):
        load_recipe("recipes/tiny.yaml", ["plugins.shapes_demo.train_imges=3"])
    with pytest.raises(RecipeError, match=r"plugins.shapes_demo.blank_images: expected true or false, got 'maybe'"):
        load_recipe("recipes/tiny.yaml", ["plugins.shapes_demo.blank_images=maybe"])
    r = load_recipe("recipes/tiny.yaml", ["plugins.shapes_demo.blank_images=true",
                                          "plugins.shapes_demo.blind_twin=false"])
    opts = r.plugins["shapes_demo"]
    assert (opts.blank_images, opts.blind_twin, opts.train_images, opts.heldout_images) == (True, False, 4000, 200)
    assert load_recipe({"plugins": {"shapes_demo": None}}).plugins["shapes_demo"] == type(opts)()  # defaults
    assert load_recipe({}).plugins == {}  # no key: no plug-in active


def test_recipe_with_plugins_round_trips(tmp_path):
    r = load_recipe("recipes/tiny.yaml", ["plugins.shapes_demo.train_images=12"])
    path = tmp_path / "resolved.yaml"
    r.save(path)
    again = load_recipe(path)
    assert again == r and again.plugins["shapes_demo"].train_images == 12
    assert r.to_dict()["plugins"]["shapes_demo"]["train_images"] == 12  # plain data in to_dict / YAML
    assert load_recipe(r, ["train.seed=3"]).plugins == r.plugins  # through to_dict() with overrides


def test_runtime_plugin_options_and_bad_plugins(monkeypatch):
    from dataclasses import dataclass

    from mmkit.plugin import Plugin
    from mmkit.registry import plugins

    @dataclass
    class Opts:
        level: int = 1

    class WithOptions(Plugin):
        options = Opts

    plugins.register("runtime_plugin", obj=WithOptions())
    plugins.register("no_options", obj=object())
    try:
        r = load_recipe({"plugins": {"runtime_plugin": {"level": 3}}})
        assert r.plugins == {"runtime_plugin": Opts(3)}
        with pytest.raises(RecipeError, match=r"plugins.runtime_plugin.level: expected an integer, got 'high'"):
            load_recipe({"plugins": {"runtime_plugin": {"level": "high"}}})
        with pytest.raises(RecipeError, match="plugins.no_options: plug-in 'no_options' has no options dataclass"):
            load_recipe({"plugins": {"no_options": {}}})
    finally:
        plugins.unregister("runtime_plugin")
        plugins.unregister("no_options")
    with pytest.raises(RecipeError, match="unknown plugin 'runtime_plugin'"):
        load_recipe({"plugins": {"runtime_plugin": {}}})


def test_entry_point_objects_that_are_not_callable_register(monkeypatch):
    module = types.ModuleType("fake_mmkit_plugin2")
    module.PLUGIN = types.SimpleNamespace(options=None)
    monkeypatch.setitem(sys.modules, "fake_mmkit_plugin2", module)
    ep = importlib.metadata.EntryPoint(name="thing", value="fake_mmkit_plugin2:PLUGIN", group="mmkit.plugins")
    mod_ep = importlib.metadata.EntryPoint(name="mod", value="fake_mmkit_plugin2", group="mmkit.plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: [ep, mod_ep] if group == "mmkit.plugins" else [])
    reg = Registry("plugin", "mmkit.plugins")
    assert reg.get("thing") is module.PLUGIN  # a plug-in instance, registered under the entry point's name
    assert "mod" not in reg  # a module registers itself on import, it is not an entry


def test_unknown_name_without_a_close_match_and_empty_registry():
    reg = Registry("thing")
    with pytest.raises(UnknownNameError, match=r"^unknown thing 'x'; choices: \(none registered\)$"):
        reg.get("x")
    reg.register("alpha", aliases=("a1",), obj=1)
    with pytest.raises(UnknownNameError, match=r"^unknown thing 'zzz'; choices: alpha$"):
        reg.get("zzz")
    assert reg.unregister("a1") == 1 and reg.names(include_aliases=True) == []


def test_recipe_video_token_is_the_processors_placeholder():
    import mmkit

    model = mmkit.build("recipes/tiny.yaml", ["model.video_token=<vid>"])
    assert model.processor.video_token == "<vid>"
    with pytest.raises(ValueError, match=r"1 videos given, but the texts have 0 <image> and 0 <vid> placeholders"):
        model.processor(text=["<video> is not this model's placeholder"], videos=[[]])


@pytest.mark.parametrize("override,message", [
    ("=5", "override '=5': expected key.path=value (the key is empty)"),
    ("model.max_length.x=1", "override 'model.max_length.x=1': model.max_length is 256, not a mapping"),
    ("stages[5].lr.llm=1", "override 'stages[5].lr.llm=1': index 5 is out of range (stages has 2 entries)"),
])
def test_bad_overrides_are_one_line(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/tiny.yaml", [override])
    assert str(err.value) == f"recipes/tiny.yaml: {message}"


def test_base_must_name_files_and_parts_need_a_source(tmp_path):
    path = write(tmp_path, "r.yaml", "base: [42]\n")
    with pytest.raises(RecipeError, match=r"r.yaml: base: expected a recipe file name \(or a list of them\), got 42"):
        load_recipe(path)
    import mmkit

    empty = write(tmp_path, "empty.yaml", "{}\n")  # would otherwise build transformers' default 7B Llama
    with pytest.raises(RecipeError, match=r"model.vision: set pretrained .* or config"):
        mmkit.build(empty)


def test_train_cli_refuses_an_empty_stage_list(tmp_path, capsys):
    from mmkit.train.__main__ import main as train_main

    assert train_main(["recipes/tiny.yaml", "stages=[]", f"train.output_dir={tmp_path}", "--dry-run"]) == 2
    assert "the recipe has no stages, so there is nothing to train" in capsys.readouterr().err
