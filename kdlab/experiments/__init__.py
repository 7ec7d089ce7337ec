"""The papers' experiment modes that sit around the trainer.

- `noise`: the record of the corrupted training labels written beside a run (DKD Table 3);
- `hooks`: `on_setup(trainer)`, the one call the trainer makes into this package (writes the
  noise record, lets a method such as `dkd_split` look at the training set before training);
- `seeds`: the same config under several seeds (`kdlab train CONFIG --seeds N`);
- `results`: one table across the runs of a folder (`kdlab results FOLDER`).
"""
