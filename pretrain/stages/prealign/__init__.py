"""PreAlign (Li et al., EMNLP 2024; docs/prealign.md): align a random model's representations of translations
before pretraining. The alignment-initialisation stage in four parts:

    config.py       the `prealign:` section of a run config
    dictionary.py   the training data: dictionary entries from the alignment table, resumable per rank
    loss.py         word vectors per representation space, the contrastive alignment loss, the stage loss
    report.py       alignment per space (aligned vs random word pairs), its table and plot
    stage.py        `stage: prealign_init`, tying them into the trainer

The second stage, LM pretraining with input-only code-switching, is `stage: pretrain` with
`data.codeswitch_ratio` > 0 (data_pipeline/codeswitch.py).
"""
