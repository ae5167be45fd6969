"""Streaming conversion between HF ``Phi3ForCausalLM`` safetensors and project checkpoints.

``import-hf``: config.json -> ModelConfig (validated), every tensor's name and shape checked
against it from the safetensors headers alone, then one DCP save whose tensors are produced
lazily: when DCP's writer reaches ``layers.3.attention.k_proj.weight`` the K rows of that layer's
``qkv_proj`` are read from the file (positioned reads of just those bytes, no mmap), cast, written
and dropped. One DCP file per tensor keeps DCP from holding a file's tensors until it is closed, so
resident memory stays around one tensor (the largest is the embedding / head).

``export-hf``: the shard layout is planned from the checkpoint's metadata (names, global shapes,
dtypes), then layers are loaded one at a time with ``load_model_weights(keys=...)``, fused
(``qkv_proj``, ``gate_up_proj``), cast and appended to the open safetensors shard, whose header was
written first. Resident memory is about one layer plus its fused copy.

Both write into ``<output>.tmp-XXXX`` and rename it to ``<output>`` at the end: an interrupted or
failed run leaves no partial output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_phi4.checkpoint import format as ckpt_format
from megatron_phi4.checkpoint.format import CheckpointError
from megatron_phi4.models.phi4 import hf_mapping
from megatron_phi4.models.phi4.hf_mapping import HFConfigError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
DTYPE_CHOICES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(RuntimeError):
    """The input cannot be converted; the message names the file/tensor and the problem."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' -> 5*10**9, '500MiB' -> 500*2**20, '100KB', 12345 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


# --------------------------------------------------------------------------- safetensors reading
class SafetensorsFile:
    """Header of one .safetensors file plus positioned reads of single tensors or row ranges.

    Reads copy just the requested bytes into a fresh buffer (no memory map), so the process's
    resident memory holds only the tensor in flight, never pages of the rest of the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{self.path}: not a safetensors file (too short)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > 100 * 2**20 or n + 8 > os.path.getsize(self.path):
                raise ConversionError(f"{self.path}: not a safetensors file (bad header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, dict] = header
        for name, info in header.items():
            if info.get("dtype") not in _ST_DTYPES:
                raise ConversionError(f"{self.path}: {name}: unsupported dtype {info.get('dtype')!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.tensors[name]["dtype"]]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self.tensors[name]
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = info["data_offsets"]
        if rows is not None:
            a, b = rows
            row_bytes = math.prod(shape[1:]) * _itemsize(dtype)
            begin, end = begin + a * row_bytes, begin + b * row_bytes
            shape = (b - a,) + shape[1:]
        nbytes = end - begin
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            done = 0
            while done < nbytes:
                got = f.readinto(view[done:done + (1 << 28)])
                if not got:
                    raise ConversionError(f"{self.path}: truncated while reading {name}")
                done += got
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class HFCheckpointReader:
    """The safetensors files of an HF model directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: HF model directory does not exist")
        index, single = self.dir / SAFE_INDEX, self.dir / SAFE_SINGLE
        files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                if fname not in files:
                    if not (self.dir / fname).is_file():
                        raise ConversionError(f"{index} names shard {fname}, which is missing from {self.dir}")
                    files[fname] = SafetensorsFile(self.dir / fname)
                if name not in files[fname].tensors:
                    raise ConversionError(f"{index}: {name} is mapped to {fname}, which does not contain it")
                self.location[name] = files[fname]
        elif single.is_file():
            f = SafetensorsFile(single)
            self.location = {name: f for name in f.tensors}
        else:
            raise ConversionError(f"{self.dir}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found (only "
                                  f"safetensors checkpoints are supported)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: f.shape(n) for n, f in self.location.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self.location[name].dtype(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.location[name].read(name, rows)


# --------------------------------------------------------------------------- import
def _log_default(msg: str) -> None:
    print(msg, flush=True)


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike | None, dtype: str = "keep",
              check_only: bool = False, overwrite: bool = False,
              log: Callable[[str], None] = _log_default) -> Path | None:
    """HF safetensors directory -> project checkpoint at ``output`` (see module docstring).

    Everything is validated (config.json, tensor names, shapes) before anything is written;
    ``check_only`` stops there.
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype: got {dtype!r}, allowed: {', '.join(DTYPE_CHOICES)}")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: HF model directory does not exist")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{hf_dir}: config.json is missing")
    cfg = hf_mapping.model_config_from_hf(cfg_path)
    reader = HFCheckpointReader(hf_dir)
    try:
        hf_mapping.check_hf_names_and_shapes(cfg, reader.shapes())
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    target = DTYPE_CHOICES[dtype]
    total = sum(math.prod(s.shape) for s in hf_mapping.tensor_specs(cfg))
    log(f"[import-hf] {hf_dir}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, {total:,} parameters: OK")
    if check_only:
        return None
    if output is None:
        raise ValueError("--output is required unless --check is given")

    lazy = {}
    start = time.time()
    for label, specs in hf_mapping.spec_groups(cfg):
        first = True
        for spec in specs:
            src_dtype = reader.dtype(spec.hf_name)
            out_dtype = target or src_dtype
            for name, a, b in spec.parts:
                def produce(spec=spec, a=a, b=b, out_dtype=out_dtype, label=label, first=first):
                    if first:
                        log(f"[import-hf] {label} ({time.time() - start:.1f}s)")
                    rows = None if (a, b) == (0, spec.shape[0]) else (a, b)
                    return reader.read(spec.hf_name, rows).to(out_dtype)
                lazy[name] = (spec.our_shape(name), out_dtype, produce)
                first = False
    out = ckpt_format.save_model_weights(
        None, output, cfg, lazy=lazy, overwrite=overwrite,
        source={"type": "hf", "path": str(hf_dir.resolve()), "dtype": dtype})
    log(f"[import-hf] wrote {output} in {time.time() - start:.1f}s")
    return out


# --------------------------------------------------------------------------- export
def _safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offset


class _ShardWriter:
    """Appends tensors to pre-planned safetensors shards, header first, bytes in planned order."""

    def __init__(self, out_dir: Path, shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]]):
        self.out_dir, self.shards = out_dir, shards
        n = len(shards)
        self.names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [(si, e) for si, shard in enumerate(shards) for e in shard]
        self.pos, self.cur, self.file = 0, -1, None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, (want, dtype, shape) = self.order[self.pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"export order broken: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {want} {dtype} {shape}")
        if si != self.cur:
            self._close()
            self.cur = si
            self.file = open(self.out_dir / self.names[si], "wb")
            self.file.write(_safetensors_header(self.shards[si])[0])
        t = tensor.detach().contiguous()
        if t.numel():
            self.file.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self.pos += 1

    def _close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def finish(self) -> dict[str, str]:
        self._close()
        if self.pos != len(self.order):
            raise AssertionError(f"export wrote {self.pos} of {len(self.order)} tensors")
        return {name: self.names[si] for si, (name, _, _) in self.order}


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int):
    """Pack tensors in order into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for e in entries:
        n = math.prod(e[2]) * _itemsize(e[1])
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur:
        shards.append(cur)
    return shards


def export_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "keep",
              max_shard_size: str | int = "5GB", overwrite: bool = False,
              log: Callable[[str], None] = _log_default) -> Path:
    """Project checkpoint (or run root with ``latest``) -> HF ``Phi3ForCausalLM`` directory."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype: got {dtype!r}, allowed: {', '.join(DTYPE_CHOICES)}")
    max_bytes = parse_size(max_shard_size)
    ckpt = ckpt_format.resolve_checkpoint(checkpoint)
    meta = ckpt_format.read_meta(ckpt)
    cfg = ckpt_format.model_config_from_meta(meta)
    tmeta = ckpt_format.checkpoint_tensor_meta(ckpt)
    expected = hf_mapping.our_shapes(cfg)
    missing = [n for n in expected if n not in tmeta]
    if missing:
        raise ConversionError(f"{ckpt}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    bad = [f"{n}: {tmeta[n][0]} (config implies {s})" for n, s in expected.items() if tmeta[n][0] != s]
    if bad:
        raise ConversionError(f"{ckpt}: tensor shapes do not match meta.json's model config: {'; '.join(bad[:5])}")
    target = DTYPE_CHOICES[dtype]
    specs = hf_mapping.tensor_specs(cfg)
    entries = [(s.hf_name, target or tmeta[s.parts[0][0]][1], s.shape) for s in specs]
    shards = plan_shards(entries, max_bytes)
    float_dtypes = {d for _, d, _ in entries if d.is_floating_point}
    config_dtype = target or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    output = Path(output)
    log(f"[export-hf] {ckpt} -> {output}: {cfg.num_layers} layers, {len(shards)} shard(s)")
    start = time.time()

    def build(tmp: Path) -> None:
        writer = _ShardWriter(tmp, shards)
        for label, group in hf_mapping.spec_groups(cfg):
            names = [n for s in group for n in s.our_names]
            tensors = ckpt_format.load_model_weights(ckpt, keys=names, tensor_meta=tmeta)
            for spec in group:
                fused = spec.fuse(tensors)
                writer.write(spec.hf_name, fused.to(target or tmeta[spec.parts[0][0]][1]))
                del fused
            del tensors
            log(f"[export-hf] {label} ({time.time() - start:.1f}s)")
        weight_map = writer.finish()
        total = sum(math.prod(s) * _itemsize(d) for _, d, s in entries)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total,
                                  "total_parameters": sum(math.prod(s) for _, _, s in entries)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = hf_mapping.hf_config_from_model(cfg, dtype=config_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "megatron_phi4_source.json").write_text(json.dumps(
            {"checkpoint": str(Path(ckpt).resolve()),
             **{k: v for k, v in meta.items() if k not in ("model",)}}, indent=2, default=str) + "\n")

    ckpt_format.write_atomically(output, build, overwrite=overwrite)
    log(f"[export-hf] wrote {output} in {time.time() - start:.1f}s")
    return output


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert between Hugging Face Phi3ForCausalLM safetensors (e.g. microsoft/phi-4) and "
                    "megatron_phi4 checkpoints. Streams tensor by tensor / layer by layer; outputs are "
                    "written to a temporary directory and renamed into place when complete.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF safetensors directory -> project checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and model.safetensors "
                                                     "(or model.safetensors.index.json + shards)")
    imp.add_argument("--output", help="checkpoint directory to create")
    imp.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep",
                     help="dtype of the stored weights (default: keep the HF file's)")
    imp.add_argument("--check", action="store_true",
                     help="only validate config.json and every tensor's name and shape, write nothing "
                          "(the same checks always run before an import writes anything)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    exp = sub.add_parser("export-hf", help="project checkpoint -> HF Phi3ForCausalLM directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run checkpoint root "
                                                         "with a 'latest' file")
    exp.add_argument("--output", required=True, help="HF model directory to create")
    exp.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep",
                     help="dtype of the exported weights (default: keep the checkpoint's)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import-hf":
            if not args.check and not args.output:
                raise ValueError("--output is required unless --check is given")
            import_hf(args.hf_dir, args.output, dtype=args.dtype, check_only=args.check, overwrite=args.overwrite)
        else:
            export_hf(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite)
    except (ConversionError, CheckpointError, HFConfigError, ValueError, OSError) as e:
        print(f"convert_checkpoint.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
