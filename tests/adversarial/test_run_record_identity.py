"""The run record identifies the model itself, and a piece of another configuration is never used.

`run.json` carries `model_sha256`, a digest of the loaded model's parameters and buffers (names,
shapes, dtypes, values) and of what defines its code, however the model was built (a checkpoint,
a Hugging Face folder, a factory that loads its own weights); every piece in `partial/` carries
the digest of the configuration that computed it. Each test's docstring names the promise.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch
from torch import nn

from probe import ablate
from probe.commands.model_identity import model_digest
from probe.commands.run_folder import RunDirectory
from tiny_models import BNNet, Classifier

SKIP = ["--skip", "degradation", "skipping", "attribution", "uncertainty", "representation", "recalibration", "lm"]


def _run(capsys, *argv) -> tuple[int, str]:
    code = ablate.main([*argv, "--no-progress", *SKIP])
    return code, capsys.readouterr().err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("probe.ablate: error:")]


def _record(out) -> dict:
    return json.loads((out / "run.json").read_text())


# -- the model's digest ---------------------------------------------------------------------------


def test_the_model_digest_changes_with_any_weight_buffer_name_shape_or_dtype():
    """The run record identifies the model itself: one changed parameter value, buffer value,
    name, shape or dtype gives another digest; equal models (two builds of the same weights,
    in either memory format) give the same one."""
    digest = model_digest(BNNet().eval())
    assert len(digest) == 16 and digest == model_digest(BNNet().eval())
    assert model_digest(Classifier().to(memory_format=torch.channels_last)) == model_digest(Classifier())

    def changed(edit) -> str:
        other = BNNet().eval()
        with torch.no_grad():
            edit(other)
        return model_digest(other)

    digests = {
        "weight": changed(lambda m: m.head.weight.view(-1)[0].add_(1e-6)),
        "buffer": changed(lambda m: m.norm.running_mean.view(-1)[0].add_(1e-6)),
        "dtype": changed(lambda m: m.double()),
        "shape": changed(lambda m: setattr(m, "extra", nn.Parameter(torch.zeros(2)))),
        "other shape": changed(lambda m: setattr(m, "extra", nn.Parameter(torch.zeros(1, 2)))),
        "name": changed(lambda m: setattr(m, "extra2", nn.Parameter(torch.zeros(2)))),
    }
    assert digest not in digests.values() and len(set(digests.values())) == len(digests)


def test_the_model_digest_names_the_code_that_runs_the_weights():
    """The run record identifies the model's code: the same weights in another class (a
    subclass that overrides forward) give another digest."""
    class Other(Classifier):
        def forward(self, x):
            return -super().forward(x)

    assert model_digest(Classifier()) != model_digest(Other())


def test_the_model_digest_costs_one_pass_of_sha256_over_the_weights():
    """It costs little next to a run: about what sha256 alone takes over the weights' bytes, read
    once where they lie (no copies, no serialization). Timed against that pass on the same
    machine, so that a busy machine slows both alike (SmolLM2-135M: 0.3 to 0.6 s, in the docs)."""
    model = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(8)))  # 32 MB of float32
    raw = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).view(torch.uint8).numpy()

    def fastest(work) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return min(times)

    assert fastest(lambda: model_digest(model)) < 2 * fastest(lambda: hashlib.sha256(raw).digest()) + 0.02


# -- case 4: a model rebuilt in place must not resume ----------------------------------------------


def _word_tokenizer():
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    vocabulary = {word: i for i, word in enumerate(["[UNK]", *(f"w{i}" for i in range(49))])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _save_llama(folder, seed: int) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=50,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, initializer_range=0.3)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)


def test_a_hugging_face_folder_saved_again_in_place_is_not_resumed(tmp_path, capsys):
    """Changing a weight never resumes: a retrained model saved into the same `hf:` folder makes
    a rerun into the same --out another configuration (one line naming model_sha256, exit 2),
    not the old numbers with exit 0."""
    folder, text, out = tmp_path / "lm", tmp_path / "t.txt", tmp_path / "run"
    text.write_text(" ".join(f"w{(7 * i) % 49}" for i in range(200)))
    argv = ["--model", f"hf:{folder}", "--dataset", "text", "--data-root", str(text), "--seq-len", "16",
            "--limit", "4", "--batch-size", "4"]
    _save_llama(folder, seed=0)
    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 0, err
    first = pd.read_csv(out / "blocks.csv")
    recorded = _record(out)

    _save_llama(folder, seed=1)  # "retrained", saved over the same files
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "fresh"))
    assert code == 0, err
    fresh = pd.read_csv(tmp_path / "fresh" / "blocks.csv")
    assert not fresh["loss"].equals(first["loss"])  # the new weights give other numbers

    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 2 and len(_errors(err)) == 1 and "Traceback" not in err, err
    assert "another configuration" in err and "model_sha256" in err
    pd.testing.assert_frame_equal(pd.read_csv(out / "blocks.csv"), first)  # nothing overwritten
    assert recorded["checkpoint_sha256"] is None and len(recorded["model_sha256"]) == 16


FACTORY = textwrap.dedent('''
    from pathlib import Path

    import torch

    from tiny_models import Classifier

    WEIGHTS = Path(__file__).with_name("factory_weights.pt")


    def factory():
        """A model that loads its own weights, from a file next to this module."""
        model = Classifier()
        model.load_state_dict(torch.load(WEIGHTS))
        return model
''')


def test_a_factory_whose_weights_file_was_replaced_is_not_resumed(tmp_path, monkeypatch, capsys):
    """Changing a weight never resumes: `--model package.module:factory` that loads its own
    weights has its digest in the run record (checkpoint_sha256 is None there); a replaced weights
    file makes a rerun into the same --out another configuration, refused in one line."""
    (tmp_path / "own_weights.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("own_weights", None)
    torch.save(Classifier(seed=0).state_dict(), tmp_path / "factory_weights.pt")
    out = tmp_path / "run"
    argv = ["--model", "own_weights:factory", "--dataset", "tiny_models:labelled_images", "--batch-size", "8"]
    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 0, err
    first = pd.read_csv(out / "blocks.csv")
    recorded = _record(out)

    torch.save(Classifier(seed=5).state_dict(), tmp_path / "factory_weights.pt")
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "fresh"))
    assert code == 0, err
    assert not pd.read_csv(tmp_path / "fresh" / "blocks.csv")["loss"].equals(first["loss"])

    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 2 and len(_errors(err)) == 1 and "Traceback" not in err, err
    assert "another configuration" in err and "model_sha256" in err
    pd.testing.assert_frame_equal(pd.read_csv(out / "blocks.csv"), first)
    assert recorded["checkpoint_sha256"] is None and len(recorded["model_sha256"]) == 16

    torch.save(Classifier(seed=0).state_dict(), tmp_path / "factory_weights.pt")  # the same weights again
    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 0, err  # resumes
    pd.testing.assert_frame_equal(pd.read_csv(out / "blocks.csv"), first)


# -- case 5: pieces say which configuration made them ----------------------------------------------


def test_pieces_of_another_mode_are_recomputed_without_run_json(tmp_path, capsys):
    """A piece of another configuration is never used, with or without run.json: a --mode zero
    run stopped after 4 sweep pieces, its run.json deleted, rerun with --mode mean, writes the
    numbers of a fresh mean run (the zero run's pieces are recomputed, with one warning line
    naming the difference)."""
    out = tmp_path / "run"
    argv = ["--model", "tiny_models:classifier", "--dataset", "tiny_models:labelled_images", "--batch-size", "8",
            "--save-every", "1"]
    code, err = _run(capsys, *argv, "--out", str(out), "--mode", "zero")
    assert code == 0, err
    zero = pd.read_csv(out / "blocks.csv")
    # As if stopped mid-sweep and its run.json deleted: only the measure and first sweep pieces are left.
    for path in out.iterdir():
        if path.name != "partial":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (out / "partial").glob("*sweep-1.pt"):
        path.unlink()
    assert sorted(p.name for p in (out / "partial").glob("sweep-*.pt")) == ["sweep-0.pt"]

    code, err = _run(capsys, *argv, "--out", str(tmp_path / "fresh"), "--mode", "mean")
    assert code == 0, err
    fresh = pd.read_csv(tmp_path / "fresh" / "blocks.csv")
    assert fresh.loc[0, "accuracy_drop"] != zero.loc[0, "accuracy_drop"]  # the modes differ on block0

    code, err = _run(capsys, *argv, "--out", str(out), "--mode", "mean")
    assert code == 0, err
    assert (out / "blocks.csv").read_text() == (tmp_path / "fresh" / "blocks.csv").read_text()
    warnings = [line for line in err.splitlines() if "another configuration" in line]
    assert len(warnings) == 1 and "mode: 'zero' there, 'mean' now" in warnings[0], err
    assert _record(out)["mode"] == "mean"


def test_a_piece_is_used_only_by_the_configuration_that_made_it(tmp_path):
    """A piece of another configuration is never used: with run.json deleted, a piece made under
    another record is dropped with a warning naming the difference; one made by an earlier probe
    (with no configuration recorded) is dropped too; the same configuration reads its piece back,
    with or without run.json."""
    with RunDirectory(tmp_path, {"model": "m", "mode": "zero", "threads": "1"}) as run:
        run.save("measure", pd.DataFrame({"a": [1.0]}))
        run.save("seconds-measure", 2.5)
    (tmp_path / "run.json").unlink()
    with RunDirectory(tmp_path, {"model": "m", "mode": "zero", "threads": "2"}) as run:  # threads not compared
        assert run.load("measure", pd.DataFrame)["a"].tolist() == [1.0]
        assert run.load("seconds-measure", float) == 2.5
    assert torch.load(tmp_path / "partial" / "seconds-measure.pt", weights_only=False) == 2.5  # plain torch.load
    (tmp_path / "run.json").unlink()
    with RunDirectory(tmp_path, {"model": "m", "mode": "mean"}) as run:
        with pytest.warns(UserWarning, match=r"measure.pt.*another configuration.*mode: 'zero' there, 'mean' now"):
            assert run.load("measure", pd.DataFrame) is None
        assert not (tmp_path / "partial" / "measure.pt").exists()
        torch.save(pd.DataFrame({"a": [3.0]}), tmp_path / "partial" / "measure.pt")  # as an earlier probe wrote it
        with pytest.warns(UserWarning, match=r"measure.pt.*does not say which configuration"):
            assert run.load("measure", pd.DataFrame) is None
