"""Train a small ViT on mnist5k: exact, then sampling only the attention and MLP linears.

A sketch policy can name modules: ``{"blocks.*.attn/linear": sketch}`` samples
the linear ops inside every block's attention and leaves the patch embedding
and the head exact. The same policy is what ``rbprop train --sketch-scope``
builds.

    python examples/train_vit.py --epochs 10 --sketch bernoulli:0.5
"""

import argparse
import time

import rbprop as rb
from rbprop import nn, optim
from rbprop.cost import CostMeter
from rbprop.data import BatchLoader, load_dataset
from rbprop.functional import cross_entropy
from rbprop.train import evaluate


def train(policy, epochs: int, seed: int = 0) -> None:
    data = load_dataset("mnist5k")
    nn.manual_seed(seed)
    model = nn.ViT(image_size=28, patch_size=4, width=64, depth=4, heads=4, pool="mean")
    # no weight decay on biases, norms, the class token and the position embeddings
    matrices = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    optimizer = optim.AdamW(
        [{"params": matrices}, {"params": others, "weight_decay": 0.0}],
        lr=3e-3,
        weight_decay=0.05,
    )
    loader = BatchLoader(data.train_images, data.train_labels, batch_size=128, seed=seed)
    schedule = optim.WarmupCosine(optimizer, epochs * len(loader), warmup_steps=len(loader))

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
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.4f}")
    ratio = meter.backward_flops / meter.exact_backward_flops
    print(
        f"{time.perf_counter() - start:.0f}s; backward FLOPs {ratio:.2f} of exact; "
        f"linear ops sampled: {meter.per_op['linear'].sampled_calls} "
        f"of {meter.per_op['linear'].calls}\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sketch", default="bernoulli:0.5")
    args = parser.parse_args()
    print("exact")
    train(None, args.epochs)
    print(f"{args.sketch} on the attention and MLP linears of every block")
    sketch = rb.sketch.parse(args.sketch)
    train({"blocks.*.attn/linear": sketch, "blocks.*.mlp/linear": sketch}, args.epochs)
