"""Post-training quantization of the main job's float ResNet against quantization-aware
training.

    for S in 0 1 2; do python -m experiments.train \\
        --config=experiments/configs/fashion_mnist.py --config.quantizer=float \\
        --config.seed=$S --workdir=/work/runs/resnet_float_s$S; done
    python benchmarks/ptq_resnet.py --float_workdirs=/work/runs/resnet_float_s0,... \\
        [--qat_workdirs=3:/work/runs/resnet_ds3_s0,4:/work/runs/resnet_ds4_s0]

For each float run (the main job's config with ``--config.quantizer=float``; its seed
read from the workdir's ``_s<seed>`` suffix, else 0) and each width, the policy of the
main job (DenseShift, stem and head float: ``train.create_policy``) converts the trained
ResNet-8 with ``shiftjax.ptq.quantize_trained`` (``CALIBRATIONS`` below) from
``--calibration`` shuffled training images; BatchNorm re-estimation
(``transfer.recalibrate_batch_stats``) then runs ``--bn_steps`` training-mode forward
passes cycling over the same images. Top-1 is measured on all 10k test images
(``train.evaluate_test_split``, as the training reports it), with the wall and CPU
seconds of conversion + calibration (``shiftjax.benchmarking.timing``; evaluation not
included). QAT rows are the ``test_accuracy`` of the finished runs given.

``ptq.quantize_trained``'s bias correction is left out: the ResNet's convs have no bias
(each feeds a BatchNorm) and its head stays float, so it changes nothing here;
BatchNorm re-estimation is the ResNet's way to correct the output means (and variances).
"""

from __future__ import annotations

import itertools
import re
import statistics

from absl import app
from absl import flags
from absl import logging
import jax

from experiments.configs import fashion_mnist as main_job
from shiftjax import data as data_lib
from shiftjax import loop
from shiftjax import ptq
from shiftjax import train
from shiftjax import transfer
from shiftjax.benchmarking import tables
from shiftjax.benchmarking import timing

FLAGS = flags.FLAGS
flags.DEFINE_list("float_workdirs", None, "Finished float runs of the main job's config.",
                  required=True)
flags.DEFINE_list("qat_workdirs", [], "'<bits>:<workdir>' finished QAT runs of the main "
                  "job (DenseShift) to list beside the PTQ rows.")
flags.DEFINE_list("bits", ["3", "4"], "DenseShift widths.")
flags.DEFINE_integer("calibration", 512, "Training images the calibration sees.")
flags.DEFINE_integer("batch_size", 128, "Calibration batch size.")
flags.DEFINE_integer("bn_steps", 32, "BatchNorm re-estimation forward passes (momentum "
                     "0.9: 32 leave 3% of the float statistics).")
flags.DEFINE_list("calibrations", None, "Subset of CALIBRATIONS to run (default all).")

# {name: (quantize_trained keyword arguments, BatchNorm re-estimation)}
CALIBRATIONS = {
    "nearest": (ptq.CALIBRATIONS["nearest"], False),
    "error feedback": (ptq.CALIBRATIONS["error feedback"], False),
    "nearest + BN re-estimation": (ptq.CALIBRATIONS["nearest"], True),
    "error feedback + BN re-estimation": (ptq.CALIBRATIONS["error feedback"], True),
}
RECOMMENDED = "error feedback + BN re-estimation"


def config_for(quantizer: str, bits: int, seed: int):
  config = main_job.get_config()
  config.quantizer, config.bits, config.seed = quantizer, bits, seed
  config.progress_bar = False
  return config


def calibration_batches(config, images: int, batch_size: int) -> list:
  """The first ``images`` shuffled, un-augmented training images, normalized, batched."""
  ds = data_lib.make_dataset(config.dataset, batch_size=batch_size, train=True, seed=0,
                             data_dir=config.data_dir or None, augment=False,
                             image_size=config.get("image_size"))
  batches = itertools.islice(ds.iterator(0), -(-images // batch_size))
  return [data_lib.normalize(b["image"], config.dataset) for b in batches]


def top1(config, model, variables) -> float:
  state = loop.TrainState(0, variables["params"],
                          {"batch_stats": jax.device_put(variables["batch_stats"])}, None)
  return train.evaluate_test_split(config, model, state)["test_accuracy"]


def seed_of(workdir: str) -> int:
  match = re.search(r"_s(\d+)/?$", workdir)
  return int(match.group(1)) if match else 0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = config_for("float", 3, 0)
  batches = calibration_batches(base, FLAGS.calibration, FLAGS.batch_size)
  calibration = [(x,) for x in batches]
  names = FLAGS.calibrations or list(CALIBRATIONS)
  rows: dict[str, list[tuple[float, float, float]]] = {}
  for workdir in FLAGS.float_workdirs:
    seed = seed_of(workdir)
    config = config_for("float", 3, seed)
    model, variables, _ = train.restore_variables(config, workdir)
    rows.setdefault("float", []).append((top1(config, model, variables), 0.0, 0.0))
    print(f"{workdir} float: {rows['float'][-1][0]:.4f}", flush=True)
    for bits in map(int, FLAGS.bits):
      qconfig = config_for("DenseShift", bits, seed)
      policy = train.create_policy(qconfig)  # stem and head float, as the main job
      for name in names:
        kwargs, reestimate = CALIBRATIONS[name]
        out = {}

        def convert(kwargs=kwargs, reestimate=reestimate, out=out):
          out["model"], qvars = ptq.quantize_trained(model, policy, variables,
                                                     calibration, **kwargs)
          if reestimate:
            qvars = transfer.recalibrate_batch_stats(
                out["model"].apply, qvars,
                itertools.islice(itertools.cycle(batches), FLAGS.bn_steps))
          out["variables"] = qvars
          return qvars
        timed = timing.interleaved({name: convert}, repeats=1, warmup=0)[name]
        accuracy = top1(qconfig, out["model"], out["variables"])
        rows.setdefault(f"PTQ DenseShift {bits}-bit, {name}", []).append(
            (accuracy, timed.all[0], timed.counters["cpu"][0]))
        print(f"{workdir} {bits}-bit {name}: {accuracy:.4f} ({timed.all[0]:.1f} s wall, "
              f"{timed.counters['cpu'][0]:.1f} s CPU)", flush=True)
  for item in FLAGS.qat_workdirs:
    bits, workdir = item.split(":", 1)
    summary = train.read_summary(workdir)
    if summary is None:
      print(f"{workdir}: no summary.json (unfinished run), left out")
      continue
    rows.setdefault(f"QAT DenseShift {bits}-bit (the main job, 6 epochs)", []).append(
        (summary["test_accuracy"], float("nan"), float("nan")))

  reference = statistics.mean(t for t, _, _ in rows["float"])
  print(f"\nPTQ of the main job's float ResNet-8 on Fashion-MNIST ({len(rows['float'])} "
        f"float run(s)), calibration {FLAGS.calibration} training images, BN "
        f"re-estimation {FLAGS.bn_steps} passes; recommended: {RECOMMENDED}\n")
  table = []
  for name, values in rows.items():
    accuracies = [t for t, _, _ in values]
    mean, _ = tables.mean_std(accuracies)
    per_run = " / ".join(f"{100 * t:.2f}" for t in accuracies)
    seconds = ("(training)" if name.startswith("QAT") else "-" if name == "float" else
               f"{statistics.mean(w for _, w, _ in values):.1f} "
               f"({statistics.mean(c for _, _, c in values):.1f})")
    label = f"**{name}** (recommended)" if name.endswith(", " + RECOMMENDED) else name
    table.append((label, per_run, f"{100 * mean:.2f}", f"{100 * (mean - reference):+.2f}",
                  seconds))
  print(tables.markdown(("model", "test top-1 per run (%)", "mean (%)",
                         "vs float (points)", "conversion s wall (CPU)"), table))


if __name__ == "__main__":
  app.run(main)
