"""Datasets and input pipelines: offline Fashion-MNIST for tfds, numpy batches, byte text."""

from shiftjax.data.augment import CropFlip, crop_and_flip
from shiftjax.data.datasets import (
    CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN,
    IMAGENET_STD, MNIST_MEAN, MNIST_STD, SPECS, DatasetSpec, get_spec, normalize)
from shiftjax.data.fashion_mnist import prepare_fashion_mnist, read_idx
from shiftjax.data.pipeline import (
    ArraySource, EvalPipeline, Prefetcher, TrainPipeline, load_split)
from shiftjax.data import imagenet
from shiftjax.data.readers import make_dataset
from shiftjax.data import speech
from shiftjax.data import text
from shiftjax.data.speech import SpecAugment, SpeechDatasetSpec

# Datasets specified beside their own reading code register here: ImageNet is streamed
# from disk (``reader="streaming"``), the speech sets are waveforms turned into log-mel
# "images" (``SpeechDatasetSpec.load``).
SPECS[imagenet.NAME] = imagenet.SPEC
SPECS.update(speech.SPECS)
