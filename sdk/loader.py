"""Open what a user points flashport at, through one reader per format, as a model with its tokenizer.

    loaded = open_model("path")          # a bundle, a release checkpoint or transformers' save_pretrained output
    loaded.model, loaded.tokenizer, loaded.kind, loaded.manifest

The format is detected from the files, not from a flag: a bundle has `manifest.json` (flashport.bundle reads it);
a checkpoint directory has `config.json` + safetensors, read by flashport.checkpoint.CheckpointReader, which tells
the release layout from transformers' layout by the tensor names. Everything above this module (the engine
factory, expert parallelism, offload, the ONNX exporter, the benchmarks) opens models here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import (KeepExpert, bundle_config, install_placeholder, install_tensor, is_bundle, load_model,
                     rebuild_buffers)
from .checkpoint import CheckpointError, CheckpointReader
from .model import Linear, Transformer
from .signing import required_public_key
from .tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedModel:
    """A model as opened: kind is "bundle" or the checkpoint's format ("release", "hf"); manifest is the bundle's
    (None for checkpoints); tokenizer is None when the directory has no tokenizer.json (token ids only)."""

    model: Transformer
    tokenizer: Tokenizer | None
    path: Path
    kind: str
    manifest: dict | None = None


def has_tokenizer(path: str | Path) -> bool:
    """Whether the model directory at `path` holds a tokenizer.json, i.e. takes text and not only token ids.
    A cheap file check, made before any weight is read by every entrance that needs text (generate, chat, serve)."""
    return (Path(path) / TOKENIZER_FILE).is_file()


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer.json beside a model, or None when there is none (the engine then takes token ids only:
    a stand-in tokenizer would silently produce ids the model was not trained on). Raises CheckpointError when
    the tokenizer has more ids than the model's vocabulary."""
    f = Path(path) / TOKENIZER_FILE
    if not f.exists():
        return None
    tok = Tokenizer.from_file(f)
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{f}: the tokenizer has {tok.vocab_size} ids, the model's vocabulary only {vocab_size}")
    return tok


def open_model(path: str | Path, keep_expert: KeepExpert | None = None, prefer_partition: str | None = None,
               verify: bool | None = None, progress: bool = False, public_key: str | Path | None = None,
               keep_packed: bool = True) -> LoadedModel:
    """Open the model at `path` (a bundle or a checkpoint directory) on the CPU, in eval mode, with fp32 or packed
    weights as stored.

    keep_expert(prefix, e): load only the routed experts it accepts; the others become placeholders (format and
    shape, no data) for expert parallelism and offload to fill. prefer_partition: a bundle partition to read
    replicated experts from. verify: also check every file's sha256 (bundles; default FLASHPORT_VERIFY=1).
    public_key (default $FLASHPORT_PUBLIC_KEY): the bundle must carry a valid signature by this key file; a
    checkpoint directory cannot carry one and is then refused. keep_packed: release-quantized Linear weights stay
    in their stored format (see `checkpoint_model`; False for a backend that needs fp32 or its own formats).
    Raises FileNotFoundError for a missing path, CheckpointError / BundleError for files that cannot be used."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a checkpoint or bundle directory)")
    if is_bundle(path):
        tokenizer = load_tokenizer(path, bundle_config(path).vocab_size)  # cheap checks before the weights
        model, manifest = load_model(path, verify=verify, progress=progress, keep_expert=keep_expert,
                                     prefer_partition=prefer_partition, public_key=public_key)
        return LoadedModel(model, tokenizer, path, "bundle", manifest)
    if required_public_key(public_key) is not None:
        raise CheckpointError(f"{path}: a signature is required (public key given), but only a bundle can carry "
                              "one: export a signed bundle (flashport export --sign)")
    reader = CheckpointReader(path)
    tokenizer = load_tokenizer(path, reader.cfg.vocab_size)
    model = checkpoint_model(reader, keep_expert, keep_packed)
    return LoadedModel(model.eval(), tokenizer, path, reader.format)


def checkpoint_model(reader: CheckpointReader, keep_expert: KeepExpert | None = None,
                     keep_packed: bool = True) -> Transformer:
    """The model of a checkpoint, one tensor at a time (no initialised copy: the checkpoint's tensors become the
    parameters). keep_packed: a Linear weight the release stores quantized (FP8 block-128, MXFP4) or in bf16 keeps
    those bytes (`Linear.packed`, as a bundle's weights do; they dequantize to exactly what `reader.get` gives), and
    so does the embedding table (bf16 in the release; `model.Embedding` converts the rows it gathers): views of
    the memory-mapped files, never copied, so a backend that reads them in place holds each weight once;
    else every tensor is fp32. Experts keep_expert rejects become placeholders and are never read."""
    reader.check_complete()
    with torch.device("meta"):
        model = Transformer(reader.cfg)
    if not any(n.startswith("mtp.") for n in reader.shapes):
        model.mtp = torch.nn.ModuleList()
    for name, shape in reader.shapes.items():
        mod_name, _, leaf = name.rpartition(".")
        is_linear = isinstance(model.get_submodule(mod_name), Linear) and leaf == "weight"
        if is_linear and keep_expert is not None and ".ffn.experts." in name:
            prefix, rest = name.split(".ffn.experts.")
            if not keep_expert(prefix, int(rest.split(".")[0])):
                install_placeholder(model, name, "fp32", tuple(shape))
                continue
        stored = reader.packed(name) if is_linear and keep_packed else None
        if stored is not None:
            install_tensor(model, name, stored[0], tuple(shape), stored[1])
            continue
        if keep_packed and isinstance(model.get_submodule(mod_name), torch.nn.Embedding):
            # a lookup table: only gathered rows are converted (model.Embedding), so it stays as stored
            t = reader.stored_float(name)
            if t is not None and tuple(t.shape) == tuple(shape):
                model.get_submodule(mod_name).weight = torch.nn.Parameter(t, requires_grad=False)
                continue
        t = reader.get_shaped(name, shape)
        install_tensor(model, name, "int64" if t.dtype == torch.int64 else "fp32", tuple(shape), {"weight": t})
    rebuild_buffers(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{reader.path}: {name} was not loaded")
    return model
