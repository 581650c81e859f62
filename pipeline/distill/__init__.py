"""The distillation family, by the kind of knowledge a student is taught.

    logits.py     the teacher's next-token distribution (Hinton): forward / reverse KL, JSD,
                  chunked over the vocabulary; offline top-k rows; an ensemble's mean
    features.py   intermediate hidden states through a learned projection (FitNets)
    relations.py  the geometry of a batch: distances and angles between samples (RKD)
    teachers.py   where targets come from: one checkpoint, an ensemble, the previous
                  generation (born-again), a peer that trains too (mutual learning)
    objective.py  the combined loss of one batch: each term and its weight beside CE
    rows.py       a teacher's stored or served top-k rows, aligned with the student's tokens
    trainer.py    KDTrainer: TRL's SFTTrainer with the combined loss
    reference.py  the naive full-logits loss that tests and bench/ check the chunked one against

Every one is a configuration of the sft stage (pipeline/stages/sft.py, `SFTStageConfig`). Other
relatives live apart: on-policy distillation is its own stage (pipeline/stages/onpolicy.py), a
student cut from the teacher's layers is the shrink stage, sequence-level distillation is SFT on
the generate stage's traces.

A new method today: its loss as a pure function over tensors in the file of its kind of knowledge
(a new file for a new kind), with a docstring giving the formula, the paper's weight and the
choices made (positions, pooling, reduction); its term in objective.py (`term_weights`,
`distill_losses`); its config keys and checks in `SFTStageConfig`; tests of its mathematics in
tests/test_distill.py (zero when the student equals the teacher, gradients against a naive
version, its invariances) and a run in the methods study (configs/studies/methods.yaml).
"""
