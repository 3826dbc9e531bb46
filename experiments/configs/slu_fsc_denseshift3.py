"""Spoken language understanding on the real Fluent Speech Commands: 3-bit DenseShift.

FSC needs a (free) sign-up, so it is prepared from your downloaded copy first:

    python -c "from shiftjax.data.slu import fsc; fsc.prepare_fluent_speech_commands('data/tfds', manual_dir='PATH/fluent_speech_commands_dataset')"
    python -m experiments.train --config=experiments/configs/slu_fsc_denseshift3.py --config.data_dir=data/tfds --workdir=workdirs/slu_fsc_denseshift3

23,132 training utterances of 97 speakers, up to 4 s each (401 frames of 40 log-mel
bands); tested on FSC's test split (3,793 utterances of unseen speakers). Reported for a
low-bit shift ResNet: 98.76 % (PAPERS.md section 4). The model is 4x wider and 2x
deeper than the synthetic set's and the data 2x larger: run it on an accelerator.
"""

from experiments.configs import slu_denseshift3


def get_config():
  c = slu_denseshift3.get_config()
  c.dataset = "fluent_speech_commands"
  c.model = "speech_resnet14"     # two basic blocks per stage
  c.width_multiplier = 2.0
  c.batch_size = 128
  c.eval_batch_size = 250
  c.num_epochs = 30.0
  c.warmup_epochs = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return c
