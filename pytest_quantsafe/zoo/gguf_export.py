"""Write a transformers llama checkpoint as a GGUF laid out like an existing GGUF (our own writer).

Used by zoo_refuser to turn a fine-tuned SmolLM2 into a GGUF F16 that llama.cpp runs:
the template (the packaged model's F16 rung) gives every metadata key, the tokenizer,
the tensor order, shapes and types; the checkpoint gives the numbers. transformers
reorders the rows of the q/k projections when it loads a llama GGUF, so they are put
back here (``permute_rows``). Exporting an unmodified checkpoint reproduces its
template bit for bit (tests/test_zoo_refuser.py).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import atomic_path
from pytest_quantsafe.errors import ModelLoadError


def copy_fields(reader: Any, writer: Any, skip: Collection[str]) -> None:
    """Copy every key/value of a ``gguf.GGUFReader`` into a ``gguf.GGUFWriter`` but ``GGUF.*`` and ``skip``."""
    import gguf

    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub_type=sub)


#: GGUF tensor name (inside ``blk.N.``) -> transformers llama parameter (inside ``model.layers.N.``).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    """Return the transformers llama parameter name of GGUF tensor ``gguf_name`` (ModelLoadError if unknown)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise ModelLoadError(f"no transformers name for GGUF tensor {gguf_name!r}", where=gguf_name,
                         fix="the template is not a plain llama GGUF; export supports llama only")


def permute_rows(weights: Any, n_head: int) -> Any:
    """Return a q/k projection with llama.cpp's row order (the inverse of transformers' reverse permutation).

    transformers reads GGUF rows as (head, half, pair) and reorders them to (head, pair, half)
    on load (``LlamaTensorProcessor._reverse_permute_weights``); this puts them back.
    """
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def export_gguf(state_dict: dict[str, Any], template: Path, target: Path, *, general_name: str) -> Path:
    """Return ``target`` after writing ``state_dict`` (transformers llama fp32) as a GGUF laid out like ``template``.

    Every key/value of the template is copied but ``general.name``; tensors come in the
    template's order, shapes and types (F32 stays F32, the rest F16), q/k rows
    permuted back to llama.cpp's order. Written next to ``target`` and renamed into place.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(template), "r")
    arch = str(reader.fields["general.architecture"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_head_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    plan = []
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ModelLoadError(f"template tensor {t.name} is {t.tensor_type.name}, not F32/F16", where=str(template),
                                 fix="use the F16 rung (zoo.build_variant(source, 'F16')) as the template")
        name = hf_name(t.name)
        if name not in state_dict:
            raise ModelLoadError(f"the checkpoint has no {name} for GGUF tensor {t.name}", where=name,
                                 fix="export a transformers llama checkpoint of the template's model")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = state_dict[name].detach().to("cpu").float().numpy()
        if values.shape != shape:
            raise ModelLoadError(f"{name} has shape {values.shape}, the template's {t.name} {shape}", where=name,
                                 fix="the checkpoint is not the template's architecture")
        if ".attn_q." in t.name:
            values = permute_rows(values, n_head)
        elif ".attn_k." in t.name:
            values = permute_rows(values, n_head_kv)
        dtype = np.float32 if t.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
        plan.append((t.name, np.ascontiguousarray(values.astype(dtype))))
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        copy_fields(reader, writer, skip={"general.architecture", "general.alignment", "general.name"})
        writer.add_name(general_name)
        for name, values in plan:
            writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, values in plan:
            writer.write_tensor_data(values)
        writer.close()
    return target
