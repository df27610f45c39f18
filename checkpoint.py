"""
checkpoint.py: Hugging Face checkpoint directories in and out, the layout transformers and vLLM load:
    config.json                          the architecture (model.ModelConfig reads and writes it)
    model.safetensors                    every tensor, named as in model.py (= the Hugging Face names), or
    model-0000k-of-0000n.safetensors     shards of at most 5 GB, with model.safetensors.index.json naming each tensor's file
Weights come only from safetensors, never from pickles (a pickle can run code when loaded). Loading copies one tensor at
a time into an already allocated model, checking each name, shape and value, so a wrong or damaged checkpoint stops
with the file and tensor named; under FSDP each rank keeps only its shard. Saving gathers one tensor at a time.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model as M
from data import read_json  # JSON files, with errors that name the file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, dict).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for s in shards:  # a shard is a plain file name in this directory, never a path elsewhere
            if not isinstance(s, str) or os.path.basename(s) != s or s in ("", ".", ".."):
                raise ValueError(f"{index}: shard {s!r} is not a file name inside {path}")
            if not os.path.exists(os.path.join(path, s)):
                raise FileNotFoundError(f"{index}: shard file {s} is missing")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are loaded, never pickles)")
    return [single]


def load_config(path) -> M.ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found (a checkpoint directory needs config.json)")
    try:
        return M.ModelConfig.from_hf(read_json(cfg_file, dict), source=cfg_file)
    except TypeError as e:  # a field of the wrong type
        raise ValueError(f"{cfg_file}: {e}") from None


def load_model(path, device="cpu", dtype=None) -> M.Transformer:
    """Allocate an empty model, then copy tensors in one at a time from the safetensors files: peak memory
    is one model plus one tensor."""
    cfg = load_config(path)
    return load_weights(M.empty_model(cfg, device, dtype or saved_dtype(cfg)), path)


def saved_dtype(cfg):  # the dtype a checkpoint's config says its tensors are in
    return _DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)


def load_weights(model, path, place=None, share=None):
    """Copy a checkpoint's tensors into model's parameters, one tensor at a time, checking names, shapes and
    values. place(param, full_tensor) -> what to copy into param (training.py keeps an FSDP rank's shard).
    share(name, tensor) -> the part of it model holds (decode_model.py: a tensor-parallel share), read before the checks."""
    cfg = model.config
    expected = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    seen, where = set(), {}
    for file in _weight_files(path):
        try:
            f = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # a truncated or corrupt file: say which one
            raise ValueError(f"{file}: not a readable safetensors file ({str(e)[:120]})") from None
        with f:
            for name in f.keys():
                where[name] = file
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints still carry an (equal) copy of the head: checked below
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor {name!r} for a {cfg.model_type} model with this config")
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{file}: tensor {name!r} cannot be read ({str(e)[:120]})") from None
                t = share(name, t) if share else t
                if t.shape != expected[name].shape:
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                     f"config implies {tuple(expected[name].shape)}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{file}: tensor {name!r} has non-finite values (a diverged run?)")
                with torch.no_grad():
                    expected[name].copy_(place(expected[name], t) if place else t)
                seen.add(name)
    if cfg.tie_word_embeddings and "lm_head.weight" in where:
        _check_tied_copy(where["lm_head.weight"], where.get("model.embed_tokens.weight"))
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensors: {', '.join(missing[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    return model


def _check_tied_copy(head_file, embed_file):
    """A config with tied embeddings whose files also hold a head: it must equal the embedding (it is not loaded)."""
    with safe_open(head_file, framework="pt", device="cpu") as f:
        head = f.get_tensor("lm_head.weight")
    if embed_file:
        with safe_open(embed_file, framework="pt", device="cpu") as f:
            if torch.equal(head, f.get_tensor("model.embed_tokens.weight")):
                return
    raise ValueError(f"{head_file}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', but config.json "
                     "says tie_word_embeddings: it would be ignored (set tie_word_embeddings false to load it)")


def full_state_dict_items(model):
    """Yield (name, full CPU tensor) one at a time; FSDP2 DTensor shards are all-gathered per tensor
    (every rank must iterate), so a rank never holds more than one gathered tensor."""
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # Hugging Face expects tied models to carry only embed_tokens
        yield name, gathered(p).detach().to("cpu")


def gathered(p):
    """A parameter's full value: an FSDP2 shard (a DTensor) is all-gathered from every rank (every rank must call). A
    shard kept in host memory (--offload) goes to the GPU first, so the gather runs over NCCL, not the CPU's gloo."""
    if not hasattr(p, "full_tensor"):
        return p
    if p.device.type != p.device_mesh.device_type:  # offloaded: the mesh is the GPUs', the shard in host memory
        from torch.distributed.tensor import DTensor
        p = DTensor.from_local(p.to_local().to(p.device_mesh.device_type), p.device_mesh, p.placements, run_check=False,
                               shape=p.shape, stride=p.stride())
    return p.full_tensor()


def save_model(model, path, dtype=None, max_shard_bytes=5 * 2**30, rank=0):
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) in the Hugging
    Face layout, in `dtype` (default: the config's torch_dtype, the starting checkpoint's) with a torch_dtype
    that says so (non-finite values are refused). Under FSDP every rank calls this (each tensor is gathered in
    turn); only rank 0 writes. The trainers write into a fresh directory and swap it in (rundir.save_checkpoint)."""
    dtype = dtype or _DTYPES.get(str(model.config.torch_dtype).replace("torch.", ""), torch.float32)
    shards, current, size, total = [], {}, 0, 0
    for name, t in full_state_dict_items(model):
        if rank != 0:
            continue
        t = t.to(dtype)
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to save {path}: tensor {name!r} has non-finite values")
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size, total = size + nbytes, total + nbytes
    if rank != 0:
        return
    shards.append(current)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model.config.to_hf(), torch_dtype=str(dtype).replace("torch.", "")), f, indent=2)
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                             for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
