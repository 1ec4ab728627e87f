"""An adversarial audit of what a determined user can hand probe: input and target dtypes, image
files of every kind, models probe cannot instrument, command-line mistakes, dangerous `--out`
folders and legal but absurd settings.

Each test's docstring states the promise it checks, one of:
- "one-line error": the CLI prints exactly one line on stderr naming the bad value and what would
  work, exits non-zero, shows no traceback, and writes nothing (the Python API raises ProbeError);
- "no silent wrong numbers": what probe computes on unusual input is what that input means.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import probe
from probe import ablate
from probe.loading.datasets import load_dataset
from probe.loading.models import cifar_resnet
from tiny_models import TinyNet, saved_cifar_resnet, tiny_data

SKIP = ["--skip", "degradation", "skipping", "attribution", "uncertainty", "recalibration", "representation"]

# Factories a user names with --model / --dataset package.module:function.
USER_CODE = '''
import torch
from torch.utils.data import TensorDataset
from probe.loading.models import cifar_resnet

def model(num_classes=4, in_channels=1):
    torch.manual_seed(0)
    return cifar_resnet(8, num_classes=4, in_channels=1)

def scripted(num_classes=4, in_channels=1):
    return torch.jit.script(model())

def traced(num_classes=4, in_channels=1):
    return torch.jit.trace(model().eval(), torch.randn(2, 1, 16, 16))

def byte_images(split="test"):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8, generator=g), torch.arange(8) % 4)

def float_images(split="test"):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 1, 16, 16, generator=g), torch.arange(8) % 4)

def broken_data(split="test"):
    raise ValueError("my data\\nis broken")
'''


@pytest.fixture(scope="module")
def user_code(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "audit_user_code.py").write_text(USER_CODE)
    sys.path.insert(0, str(folder))
    sys.modules.pop("audit_user_code", None)
    yield "audit_user_code"
    sys.path.remove(str(folder))
    sys.modules.pop("audit_user_code", None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_cifar_resnet(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    return saved_cifar_resnet(tmp_path_factory.mktemp("ckpt"), num_classes=2, in_channels=3)


def argv(checkpoint, out, *extra):
    return ["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "24", "--batch-size", "12",
            "--out", str(out), "--no-progress", *SKIP, *extra]


def exit_code(main, args) -> int:
    """What the command exits with: main's return value, or argparse's SystemExit code."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


def one_line(capsys, prefix: str = "probe.ablate: error:") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if ": warning: " not in line]
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def image_folder(root, *, n: int = 4, size=(8, 8), classes: int = 2):
    for klass in range(classes):
        (root / f"c{klass}").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (30 * i, 100 * klass, 0)).save(root / f"c{klass}" / f"{i}.png")
    return root


def images_argv(checkpoint, root, out, *extra):
    return ["--model", "resnet8", "--checkpoint", str(checkpoint), "--dataset", "imagefolder", "--data-root",
            str(root), "--out", str(out), "--no-progress", *SKIP, *extra]


# -- command-line mistakes: argparse's own errors ------------------------------------------------


def _commands():
    return {"probe.ablate": ablate.main, "probe.train": importlib.import_module("probe.train").main,
            "analyses.skipping": importlib.import_module("analyses.skipping.__main__").main}


@pytest.mark.parametrize("command", ["probe.ablate", "probe.train", "analyses.skipping"])
@pytest.mark.parametrize("args,named", [
    (["--bogus"], "--bogus"),
    (["--seed"], "--seed"),
    (["--device", "tpu"], "tpu"),
    (["--limit", "many"], "many"),
])
def test_argparse_mistakes_are_one_line(command, args, named, capsys):
    """Promise: one-line error. An unknown option, a missing value, a bad choice or a value of
    the wrong type is one line on stderr (no usage block) and exit code 2."""
    assert exit_code(_commands()[command], args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"{command}: error:" in lines[0] and named in lines[0], lines
    assert "--help" in lines[0] and captured.out == ""


def test_a_misspelt_option_gets_a_suggestion(capsys):
    """Promise: one-line error, with a hint: the closest option is named."""
    assert exit_code(ablate.main, ["--batchsize", "3"]) == 2
    line = one_line(capsys)
    assert "--batchsize" in line and "--batch-size" in line


def test_help_still_prints_the_usage(capsys):
    """--help is no mistake: it prints the whole help on stdout and exits 0."""
    assert exit_code(ablate.main, ["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


# -- input and target dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int64])
@pytest.mark.parametrize("call", ["measure", "sweep", "block_table"])
def test_integer_images_are_refused_naming_the_dtype(dtype, call):
    """Promise: one-line error. Integer images (uint8 pixels 0..255, say) given to a float model
    raise ProbeError naming the dtype and the fix (convert and normalize as in training), not
    torch's "expected scalar type Byte but found Float" and not a blame on the data's shape."""
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=1).eval()
    inputs = torch.randint(0, 100, (4, 1, 16, 16)).to(dtype)
    with pytest.raises(probe.ProbeError, match=rf"{dtype}.*float") as caught:
        getattr(probe, call)(model, [(inputs, torch.tensor([0, 1, 2, 3]))], progress=False)
    assert "channels" not in str(caught.value)


def test_integer_images_of_your_own_data_set_are_one_line(user_code, tmp_path, capsys):
    """Promise: one-line error. The CLI on a data set of uint8 images names the dtype."""
    out = tmp_path / "o"
    assert ablate.main(["--model", f"{user_code}:model", "--dataset", f"{user_code}:byte_images", "--out", str(out),
                        "--no-progress", *SKIP]) == 2
    assert "torch.uint8" in one_line(capsys)
    assert not (out / "blocks.csv").exists()


def test_a_data_set_factory_that_raises_is_one_line(user_code, tmp_path, capsys):
    """Promise: one-line error, naming the factory and what it raised (its message on one line)."""
    assert ablate.main(["--model", f"{user_code}:model", "--dataset", f"{user_code}:broken_data", "--out",
                        str(tmp_path / "o"), "--no-progress", *SKIP]) == 2
    line = one_line(capsys)
    assert f"{user_code}:broken_data" in line and "ValueError: my data is broken" in line


# -- image files ---------------------------------------------------------------------------------


def test_a_truncated_jpeg_is_one_line_naming_the_file(rgb_checkpoint, tmp_path, capsys):
    """Promise: one-line error naming the damaged file (its header reads, its pixels do not),
    not "image file is truncated; nothing half-written was left behind"."""
    root = image_folder(tmp_path / "images")
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "c0" / "cut.jpg", quality=95)
    data = (root / "c0" / "cut.jpg").read_bytes()
    (root / "c0" / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert ablate.main(images_argv(rgb_checkpoint, root, tmp_path / "o", "--image-size", "8")) == 2
    line = one_line(capsys)
    assert "cut.jpg" in line and "half-written" not in line


def test_a_16_bit_png_keeps_its_pixel_values(tmp_path):
    """Promise: no silent wrong numbers. A 16-bit grey PNG is read as values / 65535, not clipped
    at 255 (PIL's convert("RGB") saturates every value above 255 to white)."""
    root = image_folder(tmp_path / "images", n=1)
    values = np.array([[0, 1000, 40000, 65535]] * 4, dtype=np.uint16)
    for klass in ("c0", "c1"):
        Image.fromarray(values).save(root / klass / "0.png")  # replaces the 8-bit image
    image, _ = load_dataset("imagefolder", root=root, normalize="none")[0]
    assert image.shape == (3, 4, 4)
    # 8 bits per channel after reading: the nearest of 256 levels.
    assert image[0, 0].tolist() == pytest.approx([0, 4 / 255, 156 / 255, 1.0], abs=1e-6)


@pytest.mark.parametrize("mode,value", [("F", 3.5), ("I", 70000)])
def test_images_of_unknown_range_are_refused(mode, value, tmp_path):
    """Promise: one-line error. 32-bit float or integer pixels (a float TIFF) have no known range:
    refused naming the file and its mode, instead of clipped to 0..255 without a word."""
    root = image_folder(tmp_path / "images")
    Image.new(mode, (8, 8), value).save(root / "c0" / "deep.tif")
    with pytest.raises(probe.ProbeError, match=rf"deep\.tif.*mode {mode}"):
        data = load_dataset("imagefolder", root=root, image_size=8)
        [data[i] for i in range(len(data))]
    with pytest.raises(probe.ProbeError, match=rf"deep\.tif.*mode {mode}"):
        load_dataset("imagefolder", root=root)  # the header scan of a folder without --image-size


def test_a_huge_image_is_one_line(rgb_checkpoint, tmp_path, capsys, monkeypatch):
    """Promise: one-line error naming the file, not PIL's DecompressionBombError traceback.
    (PIL's limit is lowered so that a small file stands for a 200-megapixel one.)"""
    root = image_folder(tmp_path / "images")
    Image.new("RGB", (64, 64)).save(root / "c1" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000: PIL refuses it
    assert ablate.main(images_argv(rgb_checkpoint, root, tmp_path / "o")) == 2
    assert "huge.png" in one_line(capsys)
    assert ablate.main(images_argv(rgb_checkpoint, root, tmp_path / "o", "--image-size", "8")) == 2
    assert "huge.png" in one_line(capsys)


def test_an_empty_class_folder_is_named(rgb_checkpoint, tmp_path, capsys):
    """Promise: one-line error that blames the right thing: the one class folder without images,
    not "class subfolders but no images in them" when the others hold images."""
    root = image_folder(tmp_path / "images")
    (root / "c2").mkdir()
    assert ablate.main(images_argv(rgb_checkpoint, root, tmp_path / "o")) == 2
    line = one_line(capsys)
    assert "'c2'" in line and "but no images in them" not in line


# -- models probe cannot instrument ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("call", ["find_blocks", "measure", "sweep"])
def test_a_torchscript_model_is_refused_saying_why(kind, call):
    """Promise: one-line error that blames the right thing: a TorchScript module cannot be hooked;
    not "pass one batch the model accepts" nor "a plain network has nothing to measure"."""
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    scripted = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, x)
    args = () if call == "find_blocks" else ([(x, torch.tensor([0, 1]))],)
    kwargs = {} if call == "find_blocks" else {"progress": False}
    with pytest.raises(probe.ProbeError, match="TorchScript") as caught:
        getattr(probe, call)(scripted, *args, **kwargs)
    assert "plain network" not in str(caught.value) and "batch the model accepts" not in str(caught.value)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_torchscript_model_on_the_cli_is_one_line(user_code, tmp_path, capsys):
    """Promise: one-line error saying that TorchScript cannot be instrumented."""
    for factory in ("scripted", "traced"):
        code = ablate.main(["--model", f"{user_code}:{factory}", "--dataset", f"{user_code}:float_images", "--out",
                            str(tmp_path / "o"), "--no-progress", *SKIP])
        assert code == 2 and "TorchScript" in one_line(capsys)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_dynamically_quantized_branch_is_measured():
    """Promise: no silent wrong numbers. torch.ao.quantization.quantize_dynamic turns a branch's
    Linear into a quantized one holding no nn.Parameter: its blocks are still found (not "a plain
    network"), and their ratio is the one computed by hand with the quantized layers (not the
    float model's)."""
    quantized = torch.ao.quantization.quantize_dynamic(TinyNet().eval(), {torch.nn.Linear}, dtype=torch.qint8)
    assert [block.name for block in probe.find_blocks(quantized)] == ["block1", "block2"]
    table = probe.measure(quantized, tiny_data(), progress=False)
    with torch.no_grad():  # batch by batch: dynamic quantization scales each batch's inputs by its own range
        ratios = [quantized.block1.branch(x).norm(dim=1) / x.norm(dim=1) for x, _ in tiny_data()]
    expected = torch.cat(ratios).mean().item()
    assert expected != pytest.approx(probe.measure(TinyNet().eval(), tiny_data(), progress=False)["ratio"][0])
    assert table.set_index("block").loc["block1", "ratio"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_statically_quantized_model_is_refused_saying_why():
    """Promise: one-line error that blames the right thing: a model converted to quantized
    tensors (torch.ao.quantization.convert) is refused, naming a quantized module, not torch's
    "promoteTypes with quantized numbers" or "Could not run 'aten::add.out'"."""
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.net, self.dequant = QuantStub(), cifar_resnet(8, num_classes=4, in_channels=1), DeQuantStub()

        def forward(self, x):
            return self.dequant(self.net(self.quant(x)))

    torch.manual_seed(0)
    model = Wrapped().eval()
    model.qconfig = get_default_qconfig("fbgemm")
    prepared = prepare(model)
    prepared(torch.randn(4, 1, 16, 16))
    quantized = convert(prepared)
    data = [(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]))]
    for call in (probe.measure, probe.sweep):
        with pytest.raises(probe.ProbeError, match="quantized"):
            call(quantized, data, progress=False)


# -- --out folders that would scatter files ---------------------------------------------------------


def test_an_out_folder_holding_unrelated_files_is_refused(checkpoint, tmp_path, capsys):
    """Promise: one-line error naming what is there; nothing is written next to the user's files
    (a repository root, a notes folder)."""
    out = tmp_path / "repo"
    (out / ".git").mkdir(parents=True)
    (out / "README.md").write_text("mine")
    (out / "src").mkdir()
    assert ablate.main(argv(checkpoint, out)) == 2
    line = one_line(capsys)
    assert "README.md" in line and "empty or new folder" in line
    assert sorted(p.name for p in out.iterdir()) == [".git", "README.md", "src"]


def test_out_as_the_root_folder_is_refused():
    """Promise: one-line error naming the folder: `/` never receives a run's files. (Checked where
    every command prepares its --out, before anything is written: a failing test must not litter.)"""
    from probe.files import prepare_out_dir

    with pytest.raises(probe.ProbeError, match="--out '/' is the root folder"):
        prepare_out_dir("/")


@pytest.mark.parametrize("where", ["home", "cache", "inside the cache"])
def test_out_in_a_system_place_is_refused(where, checkpoint, tmp_path, capsys, monkeypatch):
    """Promise: one-line error naming the folder: the home folder and the model cache (or a folder
    in it) never receive a run's files."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    (cache / "probe" / "models").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    out = {"home": str(home), "cache": str(cache / "probe"), "inside the cache": str(cache / "probe" / "models" / "run")}[where]
    assert ablate.main(argv(checkpoint, out)) == 2
    assert f"--out {out!r}" in one_line(capsys)
    assert sorted(p.name for p in home.iterdir()) == [] and not (cache / "probe" / "models" / "run").exists()
    assert sorted(p.name for p in (cache / "probe").iterdir()) == ["models"]


def test_out_as_the_data_root_is_refused(rgb_checkpoint, tmp_path, capsys):
    """Promise: one-line error: the outputs never go into the evaluated image folder, where
    they would land among (or become) its classes."""
    root = image_folder(tmp_path / "images")
    for out in (root, root / "c0", root / "new"):
        assert ablate.main(images_argv(rgb_checkpoint, root, out)) == 2
        assert "--data-root" in one_line(capsys)
    assert sorted(p.name for p in root.iterdir()) == ["c0", "c1"]


def test_an_analysis_into_a_run_folder_is_refused(checkpoint, tmp_path, capsys):
    """Promise: one-line error: `python -m analyses.NAME` never overwrites the tables of a
    probe.ablate run (its report and run.json would describe other numbers)."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out, "--sections", "skipping", "--skip", "degradation")) == 0
    before = (out / "skipping.csv").read_text()
    capsys.readouterr()
    skipping = importlib.import_module("analyses.skipping.__main__")
    assert skipping.main(["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "24", "--random-draws",
                          "1", "--out", str(out), "--no-progress"]) == 2
    assert "run.json" in one_line(capsys, "python -m analyses.skipping: error:")
    assert (out / "skipping.csv").read_text() == before


# -- legal but absurd settings ---------------------------------------------------------------------


@pytest.mark.parametrize("extra,named", [
    (["--threads", "10000"], "--threads 10000"),
    (["--batch-size", str(10**30)], "--batch-size"),
    (["--limit", str(10**30)], "--limit"),
    (["--seq-len", "1"], "--seq-len"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--bootstrap", "1"], "--bootstrap 1"),
    (["--bootstrap", "200", "--level", "0.999"], "at least 1000"),
])
def test_absurd_settings_are_refused_before_any_work(extra, named, checkpoint, tmp_path, capsys):
    """Promise: one-line error naming the value, before anything is loaded or written (10000
    threads on a few cores ran 45 times slower; 10**30 samples per batch was a raw ValueError;
    one bootstrap resample gave a "95% interval" that missed its own point estimate)."""
    out = tmp_path / "o"
    assert ablate.main(argv(checkpoint, out, *extra)) == 2
    assert named in one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["notes", "folder", "cache"])
def test_probe_train_never_overwrites_what_is_no_checkpoint(kind, tmp_path, capsys, monkeypatch):
    """Promise: one-line error before any training: `python -m probe.train --out` is the
    checkpoint's file, never a user's text file (it was overwritten by the checkpoint), a folder
    (it failed after training, blaming a temporary file), or a place in the model cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = {"notes": tmp_path / "notes.txt", "folder": tmp_path / "folder",
           "cache": tmp_path / "cache" / "probe" / "models" / "mine.pt"}[kind]
    if kind == "notes":
        out.write_text("my notes")
    elif kind == "folder":
        out.mkdir()
    train = importlib.import_module("probe.train")
    assert train.main(["--model", "resnet8", "--epochs", "1", "--limit", "16", "--no-progress", "--out", str(out)]) == 2
    line = one_line(capsys, "probe.train: error:")
    assert f"--out {str(out)!r}" in line
    assert (kind != "notes" or out.read_text() == "my notes") and (kind != "cache" or not out.exists())


def test_a_run_into_an_analysis_folder_is_refused(checkpoint, tmp_path, capsys):
    """Promise: one-line error: `probe.ablate` never writes into a folder holding an analysis
    command's tables and figures (it would overwrite some and leave the others beside its own,
    under a run.json that does not describe them)."""
    out = tmp_path / "analysis"
    skipping = importlib.import_module("analyses.skipping.__main__")
    assert skipping.main(["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "24", "--random-draws",
                          "1", "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert ablate.main(argv(checkpoint, out, "--sections", "skipping", "--skip", "degradation")) == 2
    line = one_line(capsys)
    assert ".csv" in line and "no run.json" in line and {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- the Python API: things that are no model, no batches -------------------------------------------


@pytest.mark.parametrize("form", ["tensor", "dataset", "none"])
@pytest.mark.parametrize("call", ["measure", "sweep"])
def test_samples_where_batches_belong_are_refused(form, call):
    """Promise: no silent wrong numbers. A tensor or a map-style Dataset passed as `data` (not a
    DataLoader) would be read sample by sample, each sample taken for a batch: TinyNet measured
    each row's 2 features as 2 samples, a conv net raised "expected 4D input". Refused, saying
    to wrap it in a DataLoader; `data=None` too."""
    from torch.utils.data import TensorDataset

    from tiny_models import TINY_X, TINY_Y

    data = {"tensor": TINY_X, "dataset": TensorDataset(TINY_X, TINY_Y), "none": None}[form]
    with pytest.raises(probe.ProbeError, match="DataLoader"):
        getattr(probe, call)(TinyNet().eval(), data, progress=False)


@pytest.mark.parametrize("model", [None, lambda x: x], ids=["none", "function"])
def test_what_is_no_module_is_refused(model):
    """Promise: one-line error naming what was given, not "'NoneType' object has no attribute
    'named_modules'"."""
    for call in (probe.measure, probe.sweep):
        with pytest.raises(probe.ProbeError, match="not a torch.nn.Module"):
            call(model, tiny_data(), progress=False)
