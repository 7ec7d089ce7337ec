"""The papers' experiment modes that sit around the trainer.

(The label-noise record a noisy run writes is `kdlab.data.noise_record`; methods that look at
the training set before training do so in `Distiller.setup`.)

- `seeds`: the same config under several seeds (`kdlab train CONFIG --seeds N`);
- `results`: one table across the runs of a folder (`kdlab results FOLDER`).
"""
