"""Train a BagNet on mnist5k with exact and with sampled VJPs, through the Trainer.

``rbprop.train.Trainer`` is what ``rbprop train`` runs: it builds the model,
optimizer, schedule and data loader from a config, seeds every draw from
``(seed, epoch, step)`` and records accuracy, FLOPs and memory per epoch.
Here the sketch samples the rows (batch x positions) of every convolution.

    python examples/train_bagnet.py --epochs 10 --sketch bernoulli:0.5
"""

import argparse
import logging

from rbprop.train import Trainer, default_config


def train(sketch: str, epochs: int) -> dict:
    config = default_config(model="bagnet", sketch=sketch, epochs=epochs)
    trainer = Trainer(config)
    print(f"{sketch}: BagNet with {trainer.model.num_parameters()} parameters")
    return trainer.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sketch", default="bernoulli:0.5", help="the sampled run's sketch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one line per epoch
    for spec in ("exact", args.sketch):
        results = train(spec, args.epochs)
        seconds = sum(results["seconds_per_epoch"])
        print(
            f"{spec:>14}: test accuracy {results['test_accuracy']:.4f}, {seconds:.0f}s, "
            f"backward {results['backward_flops'] / 1e9:.1f} GFLOP "
            f"(exact VJPs: {results['exact_backward_flops'] / 1e9:.1f}), "
            f"peak saved {results['peak_saved_bytes'] / 2**20:.1f} MiB\n"
        )
