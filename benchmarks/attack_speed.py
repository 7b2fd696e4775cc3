"""PGD-20 evaluation speed: igam's PGD against torchattacks' PGD on the same model, data and settings.

    .venv/bin/python benchmarks/attack_speed.py --model madry-mnist --dataset mnist --n 1000 --threads 1
    .venv/bin/python benchmarks/attack_speed.py --run runs/pgd-at-madry-mnist --n 1000   # a trained model

Prints seconds (best of --repeats) and the accuracy each attack leaves, then the time ratio igam/torchattacks.
igam's PGD also keeps the best iterate per example (one extra forward pass per restart); --no-keep-best
times the plain last-iterate version that torchattacks implements.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from igam.attacks import PGD, default_eps
from igam.data import load_data, make_synthetic, spec_of
from igam.models import create_model


def torchattacks_version() -> str | None:
    """torchattacks' version, or None: it is no igam dependency (install it by hand to compare)."""
    try:
        import torchattacks
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(torchattacks, "__version__", "unknown"))


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run directory: attack its trained model on its dataset "
                   "(default: a freshly initialised --model)")
    p.add_argument("--model", default="madry-mnist")
    p.add_argument("--dataset", default="mnist", help="mnist | cifar10 | ... (synthetic data of the same "
                   "shape when the files are missing)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=1000, help="test images attacked")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-keep-best", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run:
        from igam.files import read_json
        from igam.runs import Run, load_run_model

        args.dataset = read_json(Path(args.run) / "meta.json")["data"]["dataset"]
        args.data_dir = args.data_dir or Run(Path(args.run)).data_dir
    try:
        arrays = load_data(args.dataset, args.data_dir, test_subset=args.n)
        source = arrays.source
    except Exception as e:  # no data here: same shapes, synthetic pixels
        shape = "28x28x1" if "mnist" in args.dataset else "32x32x3"
        arrays = make_synthetic(f"synthetic:{shape}:10", n_train=1000, n_test=args.n)
        source = f"synthetic ({type(e).__name__}: {e})"
    spec = spec_of(arrays)
    if args.run:
        model, args.model = load_run_model(args.run, args.device), Path(args.run).name
    else:
        model = create_model(args.model, num_classes=spec.num_classes, in_chans=spec.shape[0],
                             input_size=spec.shape[1:], mean=spec.mean, std=spec.std).to(args.device).eval()
    x = arrays.x_test.float().div(255).to(args.device)
    y = arrays.y_test.to(args.device)
    eps, step = default_eps(spec.shape)
    print(f"{args.model} on {len(x)} {args.dataset} images from {source}; eps {eps:.4g}, step {step:.4g}, "
          f"{args.steps} steps, batch {args.batch_size}; torch {torch.__version__}, "
          f"{args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, device {args.device}")

    def run(attack) -> torch.Tensor:
        return torch.cat([attack(x[i:i + args.batch_size], y[i:i + args.batch_size])
                          for i in range(0, len(x), args.batch_size)])

    def acc(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x_adv).argmax(1) == y).float().mean())

    ours = PGD(model, eps, step, args.steps, keep_best=not args.no_keep_best)
    t_ours, adv = timed(lambda: run(ours), args.repeats)
    print(f"igam PGD-{args.steps} (keep_best={ours.keep_best}): {t_ours:.2f} s, accuracy {acc(adv):.2%}")
    if torchattacks_version() is None:
        print("torchattacks is not installed (it is no igam dependency; `pip install torchattacks==3.5.1` "
              "in a separate environment, as it pins requests~=2.25.1): no comparison.")
        return
    import torchattacks

    theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=args.steps, random_start=True)
    t_theirs, adv = timed(lambda: run(theirs), args.repeats)
    print(f"torchattacks {torchattacks_version()} PGD-{args.steps}: {t_theirs:.2f} s, "
          f"accuracy {acc(adv):.2%}")
    print(f"ratio igam / torchattacks: {t_ours / t_theirs:.2f}")


if __name__ == "__main__":
    main()
