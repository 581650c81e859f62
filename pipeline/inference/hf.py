"""Sampling with Hugging Face transformers (the eval stage's `backend: transformers`) and an
ensemble's own decoding loop (its members' mean probabilities, under either backend).

Prompts are split across `accelerate launch` processes and gathered on the main one; each prompt
is sampled alone with its own seed (pipeline/inference/sampling.py `sample_seed`), so the split
changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import UserError
from pipeline.inference.sampling import SamplingKeys, sample_seed, split_think
from pipeline.prompts import Prompt, chat_prompt, render


def ensemble_members(path: str) -> list[str]:
    """The models of an ensemble entry "a+b+c"; [path] for one model (also a local path that
    exists as written, "+" and all)."""
    return [path] if "+" not in path or Path(path).exists() else path.split("+")


def sample_transformers(cfg: SamplingKeys, path: str, prompts: list, temperature: float,
                        dtype: str) -> list[dict[str, Any]] | None:
    """HF generate of the model at `path` (sample_model); the rows on the main process, None elsewhere."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype)).to(state.device).eval()
    rows = sample_model(cfg, model, tokenizer, prompts, temperature, name=Path(path).name)
    return rows if state.is_main_process else None


def sample_model(cfg: SamplingKeys, model: Any, tokenizer: Any, prompts: list, temperature: float,
                 name: str = "model") -> list[dict[str, Any]]:
    """HF generate of a loaded model; each process takes a slice of the prompts and every process
    gets all the rows back (a collective: every process calls it). Each prompt is sampled alone,
    with its own seed, so the split across processes changes nothing."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    stop_ids = _stop_ids(tokenizer, [model])
    rows = []
    with state.split_between_processes(prompts) as mine:
        for prompt in tqdm(mine, desc=f"sample {name}", disable=not state.is_main_process):
            ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").to(model.device)
            torch.manual_seed(sample_seed(cfg.seed, prompt.id, temperature, 0))
            greedy = temperature == 0
            with torch.no_grad():
                output = model.generate(**ids, do_sample=not greedy, max_new_tokens=cfg.max_tokens,
                                        num_return_sequences=cfg.num_samples, pad_token_id=tokenizer.pad_token_id,
                                        **({} if greedy else {"temperature": temperature, "top_p": cfg.top_p,
                                                              "top_k": 0}))
            new = output[:, ids["input_ids"].shape[1]:].tolist()
            rows += _completion_rows(cfg, temperature, tokenizer, prompt, new, stop_ids)
    return gather_object(rows) if state.num_processes > 1 else rows


def sample_ensemble(cfg: SamplingKeys, paths: list[str], prompts: list, temperature: float,
                    dtype: str) -> list[dict[str, Any]] | None:
    """The members' mean next-token distribution (ensemble_next_token_probs), sampled token by
    token, each member with its own KV cache. As in sample_transformers: the k samples of a prompt
    decode as one batch (num_return_sequences), seeded per prompt, prompts split across processes."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = shared_tokenizer(paths)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=_torch_dtype(dtype)).to(state.device).eval()
              for p in paths]
    stop_ids = _stop_ids(tokenizer, models)
    stop = torch.tensor(sorted(stop_ids), device=state.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    rows = []
    with state.split_between_processes(prompts) as mine, torch.no_grad():
        for prompt in tqdm(mine, desc=f"sample ensemble of {len(paths)}", disable=not state.is_main_process):
            ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
            inputs = ids.to(state.device).repeat(cfg.num_samples, 1)
            generator = torch.Generator(state.device).manual_seed(sample_seed(cfg.seed, prompt.id, temperature, 0))
            caches: list[Any] = [None] * len(models)
            ended = torch.zeros(cfg.num_samples, dtype=torch.bool, device=state.device)
            tokens = []
            for _ in range(cfg.max_tokens):
                outputs = [model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
                           for model, cache in zip(models, caches)]
                caches = [o.past_key_values for o in outputs]
                probs = ensemble_next_token_probs([o.logits[:, -1] for o in outputs], temperature, cfg.top_p,
                                                  len(tokenizer))
                token = (probs.argmax(-1) if temperature == 0
                         else torch.multinomial(probs, 1, generator=generator).squeeze(-1))
                token = token.masked_fill(ended, pad)  # an ended sequence only pads, as in HF generate
                tokens.append(token)
                ended |= torch.isin(token, stop)
                if ended.all():
                    break
                inputs = token[:, None]
            rows += _completion_rows(cfg, temperature, tokenizer, prompt, torch.stack(tokens, 1).tolist(), stop_ids)
    rows = gather_object(rows)
    return rows if state.is_main_process else None


def ensemble_next_token_probs(logits: list[Any], temperature: float, top_p: float, vocab_size: int) -> Any:
    """Next-token probabilities of an ensemble: the mean over members of softmax(logits /
    temperature), each cut to the tokenizer's `vocab_size` (checkpoints pad their vocab
    differently), then top-p. Temperature 0 (greedy: its argmax) takes the plain softmax."""
    import torch

    for member in logits:
        if member.shape[-1] < vocab_size:
            raise UserError(f"a member has {member.shape[-1]} logits for a tokenizer of {vocab_size} tokens")
    probs = torch.stack([torch.softmax(m[..., :vocab_size].float() / (temperature or 1.0), dim=-1)
                         for m in logits]).mean(0)
    if top_p < 1:  # the fewest most likely tokens that reach top_p, renormalized
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def shared_tokenizer(paths: list[str]) -> Any:
    """The one tokenizer of an ensemble's members: averaging next-token probabilities needs one vocabulary."""
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(p) for p in paths]
    for path, tokenizer in zip(paths[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != tokenizers[0].get_vocab():
            raise UserError(f"ensemble members {paths[0]} and {path} have different tokenizers ({len(tokenizers[0])} "
                            f"and {len(tokenizer)} tokens): an ensemble averages next-token probabilities, so its "
                            "members must share one vocabulary")
    return tokenizers[0]


def _stop_ids(tokenizer: Any, models: list[Any]) -> set[int]:
    """The tokenizer's EOS and each model's generation_config EOS ids (HF generate and vLLM stop at any)."""
    ids = {tokenizer.eos_token_id}
    for model in models:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    return ids - {None}


def _completion_rows(cfg: SamplingKeys, temperature: float, tokenizer: Any, prompt: Prompt,
                     sequences: list[list[int]], stop_ids: set[int]) -> list[dict[str, Any]]:
    """The records of one prompt's k sampled sequences (new token ids, cut after the first stop id)."""
    rows = []
    for index, sequence in enumerate(sequences):
        end = next((i for i, token in enumerate(sequence) if token in stop_ids), None)
        tokens = sequence if end is None else sequence[: end + 1]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append({"prompt_id": prompt.id, "prompt": chat_prompt(prompt),
                     "completion": [{"role": "assistant", "content": text}],
                     "think_closed": split_think(text, cfg.think_start, cfg.think_end)[2],
                     "reference_answer": prompt.answer, "temperature": temperature, "sample_index": index,
                     "finish_reason": "length" if end is None else "stop", "completion_tokens": len(tokens)})
    return rows


def _torch_dtype(dtype: str) -> Any:
    import torch
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def release_processes() -> None:
    """After the last collective: under N processes the gloo group goes now. Left to the
    interpreter's teardown (rank 1 exits while rank 0 scores) it can abort the process
    ("terminate called without an active exception"), which fails the launch."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        state.destroy_process_group()
