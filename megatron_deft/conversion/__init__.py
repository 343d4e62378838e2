"""Hugging Face (Llama 2/3, Qwen2/2.5, Qwen3, Mistral; Qwen3-MoE, Qwen2-MoE, Mixtral) <->
megatron-core dist checkpoint conversion.

    from megatron_deft.conversion import convert_hf_to_megatron, convert_megatron_to_hf

Command line: ``python tools/convert_checkpoint.py {hf-to-megatron,megatron-to-hf} --help``.
"""

from megatron_deft.conversion.hf_config import ConversionError
from megatron_deft.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_deft.conversion.megatron_to_hf import convert_megatron_to_hf

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]
