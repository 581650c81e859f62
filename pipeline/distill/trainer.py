"""The KD trainer: TRL's SFTTrainer whose loss is the family's combined objective (objective.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer

from pipeline import distill
from pipeline.config import UserError
from pipeline.distill.objective import batch_means, distill_losses, term_weights
from pipeline.distill.rows import TEACHER_ROWS, TeacherRowsCollator


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the family's terms (see `distill_losses`). Teachers are placed by
    accelerate as the student is: moved to the device under DDP, FSDP-wrapped under FSDP, ZeRO-3
    initialised under DeepSpeed, always in evaluation mode. A served teacher (`server`) fills the
    same rows as an offline one, batch by batch. What trains beside the student (feature
    projections, a mutual peer) hangs on it as `distill_modules`: DDP syncs it, the optimizer
    steps it, checkpoints keep it apart (`distill_modules.pt`) and the final student leaves it out."""

    def __init__(self, *args: Any, teachers: list[Any] = (), server: Any = None, kd: Any,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd = kd
        # Online: both logit matrices cut to the shared tokenizer (their padding may differ).
        # Offline: the stored ids are the teacher's own samples, which may fall in padding rows.
        self.vocab_size = (len(self.processing_class) if teachers
                           else self.model.config.get_text_config().vocab_size)
        trained = {}
        if kd.kd == "mutual":
            trained["peer"], teachers = teachers[0], []
        for name, method in distill.enabled(kd).items():  # e.g. feature KD's projections
            if method.module is not None:
                if not teachers:  # its check (needs_local_teacher) refuses such a config before this
                    raise UserError(f"{method.switch} trains parameters against a local teacher's hidden states: set "
                                    "kd: online and teacher: one model path")
                trained[name] = method.module(kd, self.model.config.get_text_config(),
                                              teachers[0].config.get_text_config())
        if trained:
            self.model.distill_modules = torch.nn.ModuleDict(trained).to(self.args.device)
        self.teachers = [self._prepare_teacher(t) for t in teachers]
        if kd.kd == "offline" or server is not None:
            self.data_collator = TeacherRowsCollator(self.data_collator, server, kd.teacher_server_top_k)

    def _prepare_teacher(self, teacher: Any) -> Any:
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed
            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # keeps only model inputs; the teacher's rows too
        self._signature_columns = [*self._signature_columns, *TEACHER_ROWS]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        unwrap = self.accelerator.unwrap_model
        losses = distill_losses(model, unwrap(model), self.teachers, [unwrap(t) for t in self.teachers], inputs,
                                self.kd, self.vocab_size, num_items_in_batch)
        # Each process's token sums are its share of the all-process batch (num_items_in_batch is
        # gathered over processes). DDP averages gradients over processes, so, as transformers'
        # Trainer.compute_loss does, scale by their number, or loss and gradients are 1/N of the truth.
        global_count = num_items_in_batch is not None and self.args.average_tokens_across_devices
        scale = self.accelerator.num_processes if global_count else 1
        steps = self.args.gradient_accumulation_steps if num_items_in_batch is not None else 1
        for key in batch_means(self.kd) & losses.keys():  # a micro-batch's mean: made a share as the token sums are
            losses[key] = losses[key] / (steps * scale)
        weights = term_weights(self.kd)
        loss = sum(weights[key] * losses[key] for key in weights)
        # Logged: what one process with the whole batch would log. Shares add up over processes, and
        # over the accumulation steps the logged mean runs over.
        shares = torch.stack([losses[key] for key in weights]).detach()
        shares = self.accelerator.reduce(shares, "sum" if global_count else "mean")
        mode = "train" if model.training else "eval"
        for key, value in zip(weights, (shares * steps).tolist()):
            self._metrics[mode][key].append(value)
        return (loss * scale, None) if return_outputs else loss * scale

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student alone; beside it, in a checkpoint, what trains with it (for resume), and in
        the final save a mutual peer as a student of its own (output_dir/peer)."""
        module = self.accelerator.unwrap_model(self.model)
        trained = module._modules.pop("distill_modules", None)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            if trained is not None:
                module.distill_modules = trained
        out = Path(output_dir or self.args.output_dir)
        if trained is None or not self.args.should_save:
            return
        if _internal_call:
            torch.save(trained.state_dict(), out / DISTILL_MODULES)
        elif "peer" in trained:
            peer, tokenizer = trained["peer"], self.processing_class
            peer.generation_config.eos_token_id, peer.generation_config.pad_token_id = (tokenizer.eos_token_id,
                                                                                        tokenizer.pad_token_id)
            peer.save_pretrained(str(out / "peer"))
            tokenizer.save_pretrained(str(out / "peer"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / DISTILL_MODULES
        if saved.is_file():
            module = self.accelerator.unwrap_model(model or self.model)
            module.distill_modules.load_state_dict(torch.load(saved, map_location="cpu"))


DISTILL_MODULES = "distill_modules.pt"
