"""Depth pruning: which decoder layers of a Qwen2 / Llama model to keep, and cutting the rest.

The shrink stage (pipeline/stages/shrink.py) picks `num_layers` of the teacher's L layers by `method`:

- every_kth (DistilBERT-style initialisation): evenly spaced layers, always the first and the
  last: layer round(i (L - 1) / (n - 1)) for i = 0..n-1 (halves round up), e.g. 8 of 24 keeps
  0 3 7 10 13 16 20 23. One layer keeps layer 0. Needs no data.
- importance (ShortGPT's Block Influence, the depth half of Minitron): on calibration prompts
  (the prompt set's rows, `calibration_prompts` of them drawn with `seed`, each rendered with
  the teacher's chat template as the generate and eval stages render it), one forward pass
  measures for every layer l

      BI_l = 1 - mean over (prompt, token) of cos(h_in_l, h_out_l)

  where h_in_l and h_out_l are the residual stream entering and leaving layer l (padding
  excluded). A layer whose output points where its input did changes little; the `num_layers`
  layers with the highest BI are kept, in their original order. h_in and h_out are taken with
  forward hooks on the decoder layers, not from `output_hidden_states`: transformers replaces
  the last of those with the final-norm output, which would skew the last layer's score.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import UserError

PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "mlp_only_layers")  # one value per decoder layer


def every_kth_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layers of `total`, first and last included (halves round up)."""
    check_num_layers(keep, total)
    if keep == 1:
        return [0]
    return [(2 * i * (total - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def most_important_layers(scores: list[float], keep: int) -> list[int]:
    """The `keep` layers with the highest scores, in their original order (ties: the earlier layer)."""
    check_num_layers(keep, len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def check_num_layers(keep: int, total: int) -> None:
    if not 1 <= keep < total:
        raise UserError(f"num_layers {keep}: the teacher has {total} decoder layers; set num_layers "
                        f"between 1 and {total - 1}")


def block_influence(model: Any, tokenizer: Any, texts: list[str], max_tokens: int,
                    batch_size: int) -> tuple[list[float], int]:
    """BI per decoder layer (1 - mean token cosine of its input and output) over `texts`, and
    the number of tokens measured. Forward hooks on each layer accumulate cosine sums, so no
    layer's hidden states are kept beyond the pass that makes them."""
    import torch

    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    mask_now: dict[str, Any] = {}
    handles = []

    def hook(index: int):
        def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[index] += (cos * mask_now["mask"]).sum().double().cpu()
        return record

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(index), with_kwargs=True))
    tokens = 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True,
                                  truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
                mask_now["mask"] = batch["attention_mask"].float()
                tokens += int(batch["attention_mask"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [float(1 - s / tokens) for s in sums], tokens


def decoder_layers(model: Any) -> Any:
    return model.model.layers

def cut_layers(model: Any, keep: list[int]) -> dict[str, Any]:
    """Keep only the decoder layers `keep` (renumbered 0..n-1) and make the config say so;
    return the per-layer config fields that were cut, with their new values."""
    import torch

    config = model.config
    total = config.num_hidden_layers
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    changed: dict[str, Any] = {}
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            changed[key] = [value[i] for i in keep]
            setattr(config, key, changed[key])
    if isinstance(getattr(config, "max_window_layers", None), int):  # Qwen2: sliding window from this layer on
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
        changed["max_window_layers"] = config.max_window_layers
    config.num_hidden_layers = len(keep)
    return changed


def check_state_dict(model: Any) -> None:
    """The cut model's weights are exactly those of its class built from its config (strict)."""
    import torch

    with torch.device("meta"):
        reference = type(model)(model.config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != got:
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise RuntimeError(f"the cut model does not match {type(model).__name__} with {model.config.num_hidden_layers} "
                           f"layers: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
