"""Train the MLP (784-512-512-10) on mnist5k with exact and with sampled VJPs.

The training loop is written out: wrapping the forward pass in
``rbprop.sampled(policy, seed)`` is all it takes to make the linear layers use
randomized VJPs; ``CostMeter`` counts the backward FLOPs each run spent.

    python examples/train_mlp.py --epochs 5 --sketch bernoulli:0.5
"""

import argparse
import time

import rbprop as rb
from rbprop import nn, optim
from rbprop.cost import CostMeter
from rbprop.data import BatchLoader, load_dataset
from rbprop.functional import cross_entropy
from rbprop.train import evaluate


def train(sketch: str, epochs: int, seed: int = 0) -> None:
    data = load_dataset("mnist5k")
    nn.manual_seed(seed)
    model = nn.MLP([784, 512, 512, 10])
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = optim.WarmupCosine(optimizer, total_steps=epochs * 32)
    loader = BatchLoader(data.train_images, data.train_labels, batch_size=128, seed=seed)
    policy = {"linear": rb.sketch.parse(sketch)}  # None (exact) keeps every VJP exact

    start = time.perf_counter()
    with CostMeter() as meter:
        for epoch in range(epochs):
            for step, (images, labels) in enumerate(loader.epoch(epoch)):
                with rb.sampled(policy, seed=(seed, epoch, step)):
                    loss = cross_entropy(model(rb.tensor(images)), rb.tensor(labels))
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                schedule.step()
            _, accuracy = evaluate(model, data.test_images, data.test_labels)
            print(
                f"{sketch:>14}  epoch {epoch + 1}: loss {loss.item():.3f}, "
                f"test accuracy {accuracy:.4f}"
            )
    print(
        f"{sketch:>14}  {time.perf_counter() - start:.1f}s, backward "
        f"{meter.backward_flops / 1e9:.1f} GFLOP of {meter.exact_backward_flops / 1e9:.1f} "
        "for exact VJPs\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sketch", default="bernoulli:0.5", help="the sampled run's sketch")
    args = parser.parse_args()
    for spec in ("exact", args.sketch):
        train(spec, args.epochs)
