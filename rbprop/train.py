"""``rbprop train`` and ``rbprop evaluate``: train MLP, BagNet or ViT exact or sampled.

``rbprop train`` builds a model for a dataset, trains it with a sketch policy
(``--sketch`` on every linear and conv2d op, or only inside the modules that
``--sketch-scope`` names), logs one line per epoch (loss, accuracy, seconds,
backward FLOPs), writes a checkpoint after every epoch and, with ``--json``,
a results file. ``--resume`` continues from the checkpoint bit-identically.

Everything random in a run is derived from ``--seed``: the initial
parameters, the batch order of epoch ``e`` (from ``(seed, e)``) and the
sketches and dropout masks of step ``t`` of epoch ``e`` (from ``(seed, e, t)``).
That is what lets a resumed run repeat an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from . import cost, functional, optim
from .autograd import no_grad
from .backend import to_device
from .checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint
from .data import DATASETS, BatchLoader, load_dataset
from .nn import MLP, BagNet, ViT, manual_seed
from .ops import dropout as dropout_ops
from .sampling import Policy, sampled
from .sketch import parse
from .tensor import Tensor

logger = logging.getLogger(__name__)

MODELS = ("mlp", "bagnet", "vit")

#: Per-model training defaults, chosen on mnist5k (10 epochs, batch 128) so that exact
#: training is accurate and bernoulli:0.5 sampling stays close to it. The ViT pools
#: by averaging per-token logits: with the class token as the only input of the head,
#: sampling the rows of every linear drops whole images along the class token's path
#: and sampled training falls far behind exact training.
DEFAULTS = {
    "mlp": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "warmup_epochs": 0.0},
    "bagnet": {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0, "warmup_epochs": 0.0},
    "vit": {
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 1.0,
        "pool": "mean",
    },
}

#: Ops that ``--sketch`` samples.
SKETCHED_OPS = ("linear", "conv2d")

#: Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "epochs",
    "stop_after",
    "json",
    "checkpoint",
    "resume",
    "device",
    "progress",
    "download",
    "data_dir",
    "eval_batch_size",
}


# -- the command line ------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist5k")
    parser.add_argument(
        "--sketch",
        default="exact",
        help="sketch for every linear and conv2d op: exact, bernoulli:R, uniform:R, rank:R, "
        "rank:R:gaussian or importance:R",
    )
    parser.add_argument(
        "--sketch-scope",
        default=None,
        help="comma-separated module patterns (e.g. 'blocks.*.attn,blocks.*.mlp'); the sketch "
        "then applies only to linear/conv2d ops inside them ('pattern/op' names one op)",
    )
    parser.add_argument(
        "--placement",
        choices=("weight", "contracted", "cotangent", "default"),
        default="weight",
        help="where the sketch sits: 'weight' (the default) samples the contracted rows "
        "(batch/positions/tokens) in the weight gradient only and keeps input gradients "
        "exact, so the noise does not compound through depth; 'contracted' samples the same "
        "rows in both gradients (J^T S v); 'cotangent' samples output features; 'default' "
        "uses each op's own ('contracted')",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "adamw"),
        default=None,
        help="default: adam for mlp and bagnet, adamw for vit",
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument(
        "--warmup-epochs", type=float, default=None, help="linear warm-up before the cosine decay"
    )
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument(
        "--clip-grad", type=float, default=None, help="clip the gradient norm to this value"
    )
    parser.add_argument(
        "--widths",
        default=None,
        help="MLP widths, e.g. 784,512,512,10 (default: input,512,512,classes)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="BagNet channels (128) or ViT width (64)"
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="BagNet 1x1 blocks (2) or ViT blocks (4)"
    )
    parser.add_argument(
        "--patch-size", type=int, default=None, help="BagNet stem patch (11) or ViT patch (4)"
    )
    parser.add_argument("--heads", type=int, default=None, help="ViT attention heads (4)")
    parser.add_argument("--mlp-ratio", type=float, default=None, help="ViT MLP expansion (2)")
    parser.add_argument(
        "--pool",
        choices=("cls", "mean"),
        default=None,
        help="ViT head input: the class token, or the mean of all tokens (default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results to this file")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="write a checkpoint here after every epoch"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint (if it exists)"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many epochs in this run (resume later)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download mnist, fashion-mnist or cifar10 if missing",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset cache directory (default: $RBPROP_DATA or ~/.cache/rbprop)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="default: the dataset the checkpoint was trained on",
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None)


# -- building blocks ---------------------------------------------------------------


def training_config(args) -> dict:
    """The options of a run with the per-model defaults filled in (JSON-able)."""
    config = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key not in ("handler", "command")
    }
    for key, value in DEFAULTS[args.model].items():
        if config.get(key) is None:
            config[key] = value
    return config


def default_config(**overrides) -> dict:
    """The config of ``rbprop train`` with no options given, updated by ``overrides``."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"default_config: unknown option {key!r}")
        setattr(args, key, value)
    return training_config(args)


def build_model(config: dict, image_shape: tuple, num_classes: int):
    """The model a config describes, for images of ``image_shape`` = (C, H, W)."""
    channels, height, width = image_shape
    name = config["model"]
    if name == "mlp":
        widths = config.get("widths")
        if widths:
            widths = [int(part) for part in str(widths).split(",")]
        else:
            widths = [channels * height * width, 512, 512, num_classes]
        if widths[0] != channels * height * width or widths[-1] != num_classes:
            raise ValueError(
                f"--widths {widths}: the first must be the input size {channels * height * width} "
                f"and the last the number of classes {num_classes}"
            )
        return MLP(widths)

    # Options left unset on the command line take the model class's defaults.
    def given(*keys):
        return {key: config[key] for key in keys if config.get(key) is not None}

    if name == "bagnet":
        return BagNet(channels, num_classes, **given("width", "depth", "patch_size"))
    if name == "vit":
        if height != width:
            raise ValueError(f"ViT: square images only, got {height}x{width}")
        options = given("patch_size", "width", "depth", "heads", "mlp_ratio", "pool")
        return ViT(height, in_channels=channels, num_classes=num_classes, **options)
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")


def build_optimizer(config: dict, model):
    """The optimizer a config describes; biases and norm parameters get no weight decay."""
    decayed, plain = [], []
    for _, param in model.named_parameters():
        (decayed if param.ndim >= 2 else plain).append(param)
    weight_decay = config["weight_decay"]
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    name, lr = config["optimizer"], config["lr"]
    if name == "sgd":
        return optim.SGD(groups, lr=lr, momentum=config["momentum"], nesterov=config["nesterov"])
    if name == "adam":
        return optim.Adam(groups, lr=lr)
    if name == "adamw":
        return optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def sketch_policy(spec: str, scope: str | None = None, placement: str | None = None):
    """The policy for ``--sketch``, ``--sketch-scope`` and ``--placement`` (None when exact).

    A resolved :class:`rbprop.sampling.Policy`, built once and reused every step
    (it remembers which sketch each op of the model gets).
    """
    sketch = parse(spec)
    if sketch is None:
        return None
    if placement not in (None, "default"):
        sketch = copy.copy(sketch)
        sketch.placement = placement
    if not scope:
        return Policy(dict.fromkeys(SKETCHED_OPS, sketch))
    policy = {}
    for pattern in (part.strip() for part in scope.split(",")):
        if not pattern:
            continue
        if "/" in pattern:
            policy[pattern] = sketch
        else:
            policy.update({f"{pattern}/{op}": sketch for op in SKETCHED_OPS})
    if not policy:
        raise ValueError(f"--sketch-scope {scope!r} names no module")
    return Policy(policy)


#: Independent random streams of one training step.
SKETCH_STREAM, DROPOUT_STREAM = 0, 1


def step_seed(seed: int, epoch: int, step: int, stream: int = SKETCH_STREAM) -> int:
    """The seed of ``stream`` at step ``step`` of epoch ``epoch`` (independent per step)."""
    sequence = np.random.SeedSequence([seed, epoch, step, stream])
    return int(sequence.generate_state(1, np.uint64)[0])


def _progress(iterable, total, enabled, description):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False, disable=None)


def evaluate(model, images, labels, batch_size: int = 500, device: str = "cpu"):
    """Mean cross-entropy loss and accuracy of ``model`` (in eval mode) on a split."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        with no_grad():
            for start in range(0, len(labels), batch_size):
                batch = slice(start, start + batch_size)
                inputs = Tensor(to_device(images[batch], device))
                targets = Tensor(to_device(labels[batch], device))
                logits = model(inputs)
                loss = functional.cross_entropy(logits, targets, reduction="sum")
                total_loss += float(loss.item())
                correct += int((logits.numpy().argmax(axis=1) == labels[batch]).sum())
    finally:
        model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


# -- training ----------------------------------------------------------------------


class Trainer:
    """One training run: model, optimizer, schedule, data, policy and history."""

    def __init__(self, config: dict):
        self.config = config
        self.dataset = load_dataset(
            config["dataset"], config.get("data_dir"), download=config.get("download", False)
        )
        manual_seed(config["seed"])
        self.model = build_model(config, self.dataset.image_shape, self.dataset.num_classes)
        self.model.to(config["device"])
        self.optimizer = build_optimizer(config, self.model)
        self.loader = BatchLoader(
            self.dataset.train_images,
            self.dataset.train_labels,
            config["batch_size"],
            shuffle=True,
            seed=config["seed"],
        )
        self.scheduler = self._scheduler()
        self.policy = sketch_policy(
            config["sketch"], config.get("sketch_scope"), config.get("placement")
        )
        self.epoch = 0
        self.history = {
            "train_loss": [],
            "train_accuracy": [],
            "test_loss": [],
            "test_accuracy": [],
            "seconds_per_epoch": [],
            "backward_flops": [],
            "exact_backward_flops": [],
            "peak_saved_bytes": 0,
        }

    def _scheduler(self):
        steps_per_epoch = len(self.loader)
        total = max(1, self.config["epochs"] * steps_per_epoch)
        warmup = min(total, int(round(self.config["warmup_epochs"] * steps_per_epoch)))
        if self.config["schedule"] == "constant":
            return None
        return optim.WarmupCosine(self.optimizer, total_steps=total, warmup_steps=warmup)

    # -- checkpoints ---------------------------------------------------------------

    def save(self, path: Path) -> None:
        extra = {
            "epoch": self.epoch,
            "config": self.config,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "history": self.history,
            # Every draw of a step is seeded from (seed, epoch, step, stream), so these
            # determine all that follows; the dropout generator is kept for completeness.
            "rng": {
                "seed": self.config["seed"],
                "next_epoch": self.epoch,
                "dropout": dropout_ops.resolve_generator(None).bit_generator.state,
            },
        }
        save_checkpoint(path, self.model, self.optimizer, extra)

    def resume(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.extra.get("config", {})
        changed = sorted(
            key
            for key in set(saved) | set(self.config)
            if key not in RESUMABLE_CHANGES and saved.get(key) != self.config.get(key)
        )
        if changed:
            details = ", ".join(
                f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in changed
            )
            raise CheckpointError(
                f"--resume: {path} was written by a run with other options ({details}); "
                "use the same options or another --checkpoint"
            )
        restore(checkpoint, self.model, self.optimizer, path)
        dropout_ops.resolve_generator(None).bit_generator.state = checkpoint.extra["rng"][
            "dropout"
        ]
        self.epoch = int(checkpoint.extra["epoch"])
        self.history = checkpoint.extra["history"]
        if saved.get("epochs") != self.config["epochs"]:
            logger.warning(
                "--epochs changed from %s to %s: the learning-rate schedule is "
                "stretched from here on",
                saved.get("epochs"),
                self.config["epochs"],
            )
        if self.scheduler is not None and checkpoint.extra.get("scheduler"):
            self.scheduler.load_state_dict(checkpoint.extra["scheduler"])
        logger.info("resumed from %s after epoch %d", path, self.epoch)

    # -- one epoch -------------------------------------------------------------------

    def train_epoch(self) -> dict:
        config, model, device = self.config, self.model, self.config["device"]
        model.train()
        losses, correct, seen = [], 0, 0
        batches = _progress(
            self.loader.epoch(self.epoch),
            len(self.loader),
            config.get("progress", True),
            f"epoch {self.epoch + 1}/{config['epochs']}",
        )
        start = time.perf_counter()
        with cost.CostMeter() as meter:
            for step, (images, labels) in enumerate(batches):
                inputs = Tensor(to_device(images, device))
                targets = Tensor(to_device(labels, device))
                dropout_ops.manual_seed(
                    step_seed(config["seed"], self.epoch, step, DROPOUT_STREAM)
                )
                policy_context = (
                    sampled(self.policy, seed=step_seed(config["seed"], self.epoch, step))
                    if self.policy is not None
                    else contextlib.nullcontext()
                )
                with policy_context:
                    logits = model(inputs)
                    loss = functional.cross_entropy(logits, targets)
                    self.optimizer.zero_grad()
                    loss.backward()
                if config.get("clip_grad"):
                    optim.clip_grad_norm_(model.parameters(), config["clip_grad"])
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                value = float(loss.item())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"epoch {self.epoch + 1}, step {step}: the loss is {value}; lower --lr "
                        "or set --clip-grad"
                    )
                losses.append(value * len(labels))
                correct += int((logits.numpy().argmax(axis=1) == labels).sum())
                seen += len(labels)
        seconds = time.perf_counter() - start
        return {
            "train_loss": sum(losses) / seen,
            "train_accuracy": correct / seen,
            "seconds": seconds,
            "backward_flops": meter.backward_flops,
            "exact_backward_flops": meter.exact_backward_flops,
        }

    def run(self, checkpoint: Path | None = None, stop_after: int | None = None) -> dict:
        config = self.config
        cost.saved_bytes.reset_peak()
        epochs_this_run = 0
        while self.epoch < config["epochs"]:
            if stop_after is not None and epochs_this_run >= stop_after:
                logger.info("stopping after %d epochs (--stop-after)", epochs_this_run)
                break
            result = self.train_epoch()
            test_loss, test_accuracy = evaluate(
                self.model,
                self.dataset.test_images,
                self.dataset.test_labels,
                config["eval_batch_size"],
                config["device"],
            )
            self.epoch += 1
            epochs_this_run += 1
            self._record(result, test_loss, test_accuracy)
            logger.info(
                "epoch %d/%d  loss %.4f  train acc %.4f  test acc %.4f  %.1fs  "
                "backward %.3f GFLOP (exact %.3f)",
                self.epoch,
                config["epochs"],
                result["train_loss"],
                result["train_accuracy"],
                test_accuracy,
                result["seconds"],
                result["backward_flops"] / 1e9,
                result["exact_backward_flops"] / 1e9,
            )
            if checkpoint is not None:
                self.save(checkpoint)
        return self.results()

    def _record(self, result: dict, test_loss: float, test_accuracy: float) -> None:
        history = self.history
        history["train_loss"].append(result["train_loss"])
        history["train_accuracy"].append(result["train_accuracy"])
        history["test_loss"].append(test_loss)
        history["test_accuracy"].append(test_accuracy)
        history["seconds_per_epoch"].append(result["seconds"])
        history["backward_flops"].append(result["backward_flops"])
        history["exact_backward_flops"].append(result["exact_backward_flops"])
        history["peak_saved_bytes"] = max(history["peak_saved_bytes"], cost.saved_bytes.peak)

    def results(self) -> dict:
        history = self.history
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "sketch": self.config["sketch"],
            "sketch_scope": self.config.get("sketch_scope"),
            "epochs_completed": self.epoch,
            "parameters": self.model.num_parameters(),
            "test_accuracy": history["test_accuracy"][-1] if history["test_accuracy"] else None,
            "test_accuracy_per_epoch": history["test_accuracy"],
            "test_loss_per_epoch": history["test_loss"],
            "train_loss": history["train_loss"],
            "train_accuracy": history["train_accuracy"],
            "seconds_per_epoch": history["seconds_per_epoch"],
            "backward_flops": int(sum(history["backward_flops"])),
            "backward_flops_per_epoch": history["backward_flops"],
            "exact_backward_flops": int(sum(history["exact_backward_flops"])),
            "peak_saved_bytes": int(history["peak_saved_bytes"]),
            "config": self.config,
        }


def run_train(args) -> int:
    config = training_config(args)
    if config["resume"] and config.get("checkpoint") is None:
        raise SystemExit("rbprop train: --resume needs --checkpoint PATH")
    trainer = Trainer(config)
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    if config["resume"]:
        if checkpoint.exists():
            trainer.resume(checkpoint)
        else:
            logger.info("no checkpoint at %s yet: starting from scratch", checkpoint)
    logger.info(
        "training %s (%d parameters) on %s, sketch %s, %s %s lr %g, %d epochs of %d steps",
        config["model"],
        trainer.model.num_parameters(),
        config["dataset"],
        config["sketch"],
        config["optimizer"],
        config["schedule"],
        config["lr"],
        config["epochs"],
        len(trainer.loader),
    )
    results = trainer.run(checkpoint, config.get("stop_after"))
    if results["test_accuracy"] is not None:
        print(
            f"test accuracy {results['test_accuracy']:.4f} after {results['epochs_completed']} "
            f"epochs; backward {results['backward_flops'] / 1e9:.2f} GFLOP; peak saved "
            f"{results['peak_saved_bytes'] / 2**20:.1f} MiB"
        )
    if config.get("json"):
        _write_json(Path(config["json"]), results)
    return 0


def run_evaluate(args) -> int:
    checkpoint = load_checkpoint(args.checkpoint)
    config = dict(checkpoint.extra.get("config") or {})
    if not config:
        raise CheckpointError(f"{args.checkpoint} holds no training configuration")
    dataset_name = args.dataset or config["dataset"]
    dataset = load_dataset(dataset_name, args.data_dir, download=args.download)
    model = build_model(config, dataset.image_shape, dataset.num_classes)
    restore(checkpoint, model, None, args.checkpoint)
    model.to(args.device)
    loss, accuracy = evaluate(
        model, dataset.test_images, dataset.test_labels, args.batch_size, args.device
    )
    results = {
        "checkpoint": str(args.checkpoint),
        "model": config["model"],
        "dataset": dataset_name,
        "epoch": checkpoint.extra.get("epoch"),
        "test_loss": loss,
        "test_accuracy": accuracy,
    }
    print(
        f"{config['model']} after epoch {results['epoch']} on {dataset_name}: "
        f"test accuracy {accuracy:.4f}, test loss {loss:.4f}"
    )
    if args.json:
        _write_json(Path(args.json), results)
    return 0


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
