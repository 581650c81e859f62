"""A teacher behind a vLLM server (`vllm serve TEACHER --max-logprobs K`), started by the user on
other GPUs or another machine: training processes send token ids and get back the teacher's
top-k log-probs at every position, so the teacher never sits on the training devices and one
server serves several runs. Used by the sft stage (`kd: online`, `teacher_server: URL`) and the
onpolicy stage (TRL's ServerDistillationTrainer).

The log-probs are the server's raw ones (T = 1, vLLM's default `logprobs_mode`); a temperature
is applied by the loss. Token ids mean the same thing on both sides only with one tokenizer:
`check_tokenizer` asks the server to tokenize a probe and compares.
"""

from __future__ import annotations

from typing import Any

import requests
import torch

from pipeline.config import UserError
from pipeline.distill.logits import LOG_ZERO

# Special tokens, think tags, digits, spaces and non-ASCII: where two tokenizers usually part ways.
PROBE = "<|im_start|>user\nWhat is 12 + 30? Résumé, naïve 数学<|im_end|>\n<think>a b  c</think>"


def client(url: str) -> Any:
    """TRL's client for the server (it retries transient failures)."""
    from trl.generation.vllm_client import VLLMClient

    return VLLMClient(base_url=url, connection_timeout=30.0)


def check_tokenizer(url: str, tokenizer: Any, student: str) -> None:
    """Refuse a served teacher whose tokenizer gives other ids than the student's (the first call
    to the server: an unreachable one is named here)."""
    try:
        response = requests.post(f"{url.rstrip('/')}/tokenize", json={"prompt": PROBE, "add_special_tokens": False},
                                 timeout=30)
        response.raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"teacher_server {url} does not answer ({type(err).__name__}); start it with `vllm "
                        "serve TEACHER --max-logprobs K` (docs/scaling.md#a-teacher-on-its-own-gpus)") from None
    served = response.json()["tokens"]
    own = tokenizer(PROBE, add_special_tokens=False).input_ids
    if served != own:
        raise UserError(f"the teacher served at {url} tokenizes differently from the student {student} "
                        f"({len(served)} vs {len(own)} ids for one probe text), so its log-probs would describe "
                        "other tokens. Distil across tokenizers with the onpolicy stage and a local teacher "
                        "(TRL's GOLD trainer, ULD loss; lmbda: 0 trains off-policy on traces)")


def topk_rows(teacher: Any, sequences: list[list[int]], k: int) -> list[dict[str, torch.Tensor]]:
    """For each sequence, the teacher's top-k ids and log-probs at every position, and the log of
    the mass outside them: row j is the distribution token j is predicted from (row 0, before
    the first token, is unused and zero), as the generate stage stores a teacher's rows."""
    result = teacher.get_sequence_logprobs(sequences=sequences, prompt_lengths=[1] * len(sequences),
                                           top_logprobs=k, temperature=1.0)
    rows = []
    for logprobs, ids in zip(result["logprobs"], result["logprob_token_ids"], strict=True):
        logprobs = torch.tensor(logprobs, dtype=torch.float64).reshape(-1, k)
        if torch.isinf(logprobs).any():  # TRL pads a short answer with -inf at id 0: a duplicate id
            raise UserError(f"the teacher server returned fewer than {k} log-probs at some position: lower the "
                            "top-k to at most the teacher's vocabulary")
        top_mass = torch.logsumexp(logprobs, dim=-1)
        rest = (-torch.expm1(top_mass)).clamp_min(0).log()  # 1 - sum(top-k), from the server's values
        rows.append({"teacher_topk_ids": torch.cat([torch.zeros(1, k, dtype=torch.long),
                                                    torch.tensor(ids, dtype=torch.long).reshape(-1, k)]),
                     "teacher_topk_logprobs": torch.cat([torch.zeros(1, k), logprobs.clamp_min(LOG_ZERO).float()]),
                     "teacher_rest_logprob": torch.cat([torch.zeros(1), rest.clamp_min(LOG_ZERO).float()])})
    return rows

