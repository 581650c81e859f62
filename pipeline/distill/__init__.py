"""The distillation family, by the kind of knowledge a student is taught.

    logits.py     the teacher's next-token distribution (Hinton): forward / reverse KL, JSD,
                  chunked over the vocabulary; offline top-k rows; an ensemble's mean
    features.py   intermediate hidden states through a learned projection (FitNets)
    relations.py  the geometry of a batch: distances and angles between samples (RKD)
    teachers.py   where targets come from: one checkpoint, an ensemble, the previous
                  generation (born-again), a peer that trains too (mutual learning)

Every one is a configuration of the sft stage (pipeline/stages/sft.py, `SFTStageConfig`), each term
weighted beside CE (`term_weights`) and computed in `distill_losses`. Other relatives live
apart: on-policy distillation is its own stage (pipeline/stages/onpolicy.py), a student cut from the
teacher's layers is the shrink stage (pipeline/stages/shrink.py), sequence-level distillation is SFT
on the generate stage's traces.

A new method: its loss as a pure function over tensors in the file of its kind of knowledge (a
new file for a new kind), with a docstring giving the formula, the paper's weight and the
choices made (positions, pooling, reduction); a config key and default weight in
`SFTStageConfig`, its term in `term_weights` and `distill_losses`; tests of its mathematics in
tests/test_distill.py (zero when the student equals the teacher, gradients against a naive
version, its invariances) and a run in the methods study (configs/studies/methods.yaml).
"""
