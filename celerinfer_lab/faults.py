"""The fault catalogue: deliberate bugs compiled into the C++ on request, to prove the debugger
finds them. Each is a ``CELERINFER_FAULT_<NAME>`` block in cpp/include/celerinfer; the normal
build defines none of them.

For each fault: what it breaks, the trace point that must be named as the culprit (in the first
layer it touches), words the diagnosis must contain (when a diagnosis applies), and the model
settings that expose it (a GQA bug is invisible when every query head has its own kv head).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fault:
    name: str
    breaks: str
    culprit: str  # trace point name
    diagnosis: str | None  # words the diagnosis contains, or None when no pattern applies
    model: dict = field(default_factory=dict)  # ModelConfig overrides that expose the fault
    padding: str = "none"

    @property
    def macro(self) -> str:
        return "CELERINFER_FAULT_" + self.name.upper()


L0 = "model.layers.0."
FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("rope_pairing_swapped", "RoPE rotates interleaved pairs where the model uses half-split ones (or the reverse)",
          L0 + "self_attn.rope_q", "RoPE pairing"),
    Fault("gqa_modulo", "query head j reads kv head j % kv_heads instead of j // (heads / kv_heads)",
          L0 + "self_attn.scores", "kv head j % kv_heads", dict(num_attention_heads=8, num_key_value_heads=2)),
    Fault("causal_mask_missing", "no -inf above the diagonal: every token sees the future",
          L0 + "self_attn.scores", "causal mask missing"),
    Fault("padding_mask_ignored", "padded keys are not masked", L0 + "self_attn.scores", "padding mask ignored",
          padding="left"),
    Fault("rmsnorm_eps_outside_sqrt", "RMSNorm divides by sqrt(mean(x^2)) + eps instead of sqrt(mean(x^2) + eps)",
          L0 + "input_layernorm", "eps outside the square root"),
    Fault("rmsnorm_weight_ignored", "RMSNorm never multiplies by its weight", L0 + "input_layernorm",
          "norm weight ignored"),
    Fault("attention_scale_1_over_d", "scores divided by head_dim instead of sqrt(head_dim)",
          L0 + "self_attn.scores", "scale error"),
    Fault("silu_as_gelu", "GELU where SwiGLU's SiLU belongs", L0 + "mlp.act", "GELU"),
    Fault("gate_up_swapped", "gate_proj and up_proj weights swapped", L0 + "mlp.gate_proj", "mlp.up_proj"),
    Fault("softmax_wrong_axis", "attention softmax over queries instead of keys", L0 + "self_attn.probs",
          "softmax over the wrong axis"),
    Fault("untied_head_as_embedding", "an untied lm_head is read as the embedding", "lm_head",
          "lm_head read as the embedding", dict(tie_word_embeddings=False)),
    Fault("moe_topk_not_renormalised", "MoE top-k weights not divided by their sum", L0 + "mlp.topk_weight",
          "not renormalised", dict(use_moe=True, num_experts=4, num_experts_per_tok=2, topk_renorm="always")),
    Fault("output_never_written", "the logits buffer is never written (the original tool's all-zero logits)",
          "lm_head", "never written"),
    Fault("residual_missing", "the attention output replaces the residual stream instead of adding to it",
          L0 + "attn_residual", "self_attn.o_proj"),
    Fault("qk_norm_skipped", "the query RMSNorm (q_norm) is skipped", L0 + "self_attn.q_norm",
          "self_attn.q_proj", dict(qk_norm=True)),
]}


def get_fault(name: str | None) -> Fault | None:
    if name is None:
        return None
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; `celerinfer-lab compare --list-faults` lists them")
    return FAULTS[name]
