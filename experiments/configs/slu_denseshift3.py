"""Spoken language understanding: a 3-bit DenseShift speech ResNet on synthetic_slu.

    python -m experiments.make_synthetic_slu --data_dir=data/tfds
    python -m experiments.train --config=experiments/configs/slu_denseshift3.py --config.data_dir=data/tfds --workdir=workdirs/slu_denseshift3

FSC's 31 intents spoken by espeak-ng/flite voices; the test split's voices are never
heard in training (``shiftjax/data/slu/synthetic.py``). Features: 40 log-mel bands,
25 ms windows every 10 ms, 2.8 s per utterance (281 frames), SpecAugment.
Measured on the shared 2-core CPU (seed 0 data, default sizes): 97.62 % test accuracy
(2,400 utterances of unseen voices) after 4,488 steps; 1,515 s of training, 1,587 s in
all with loading and evaluation. 16 epochs gave 96.92 % in 1,007 s of training.
``slu_float.py`` and ``slu_s3.py`` change only the quantizer;
``benchmarks/slu_accuracy.py`` runs the three.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model = "speech_resnet"
  c.width_multiplier = 1.0
  c.dataset = "synthetic_slu"
  c.quantizer = "DenseShift"
  c.bits = 3
  c.batch_size = 64
  c.eval_batch_size = 200
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.num_epochs = 24.0             # 4,488 steps
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return c
