"""IGAM training steps under DistributedDataParallel on every process torchrun starts (NCCL on GPUs, gloo
on CPUs), checked against the same steps without DDP. A smoke test for a machine with one (or a few) GPUs:

    torchrun --standalone --nproc-per-node 1 benchmarks/ddp_smoke.py --device cuda --json ddp.json
    torchrun --standalone --nproc-per-node 2 benchmarks/ddp_smoke.py --device cpu --tiny      # gloo

Why a script of its own: `igam train` under torchrun with one process sees WORLD_SIZE=1, starts no process
group and never wraps anything in DDP. Here the process group is always made (a group of one on one GPU:
its all-reduces are real NCCL calls), the student is wrapped as `igam train` wraps it
(DistributedDataParallel, device_ids=[local rank]) and the discriminator's update goes through its own DDP
wrapper (InputGradientMatching.wrap_discriminator), as igam.train does.

For each of exact, FD-central and FD-forward: a few Algorithm-1 steps (student step, then discriminator
step) on the first images of the packed CIFAR-10 (--data DIR with cifar10.npz; random images without it),
a frozen teacher with random weights (madry-mnist behind gray+crop28: a synthetic teacher, the same shapes
as the paper's Table 1) and a 5-layer discriminator. Checked: every loss finite, the student and the
discriminator really updated, the ranks bit-identical at the end and, with one process, the DDP run equal
to the plain run (cosine of the parameter updates >= 0.999: cuDNN kernels need not be deterministic).
Only the public API of igam is used.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from igam import GradientDiscriminator, InputGradientMatching, build_adapter, create_model

MODES = (("exact", "central"), ("finite-difference", "central"), ("finite-difference", "forward"))


def load_batches(data: str, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of `batch` CIFAR-10 training images in [0, 1] (packed npz), else random."""
    path = Path(data) / "cifar10.npz" if data else None
    need = steps * batch
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as d:
            x = torch.from_numpy(np.ascontiguousarray(d["x_train"][:need].transpose(0, 3, 1, 2)))
            y = torch.from_numpy(d["y_train"][:need].astype(np.int64))
        source = str(path)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (need, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (need,), generator=g)
        source = "random images"
    if len(x) < need:
        raise SystemExit(f"ddp_smoke: {path} holds {len(x)} training images; {need} are needed.")
    print(f"ddp_smoke: {steps} batches of {batch} images from {source}", flush=True)
    x = x.float() / 255
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(steps)]


def build(args: argparse.Namespace, mode: str, scheme: str, device: torch.device):
    """Student, IGAM module (synthetic teacher, discriminator) and both optimisers, seeded alike."""
    torch.manual_seed(0)
    width = 4 if args.tiny else 0
    student = create_model(args.model, num_classes=10, in_chans=3, input_size=32, width=width).to(device)
    body = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28, width=width)
    adapter = build_adapter("gray+crop28", (3, 32, 32), (1, 28, 28))
    teacher = nn.Sequential(adapter, body).to(device).eval().requires_grad_(False)
    disc = GradientDiscriminator((3, 28, 28), layers=5, channels=4 if args.tiny else 16).to(device)
    igm = InputGradientMatching(teacher, disc, lambda_adv=1.0, lambda_diff="auto", mode=mode,
                                fd_scheme=scheme, fd_step=1e-2, disc_view=adapter.disc_view).to(device)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    d_opt = torch.optim.SGD(disc.parameters(), lr=0.01, momentum=0.9)
    return student, igm, s_opt, d_opt


def run_steps(call: nn.Module, igm: InputGradientMatching, s_opt, d_opt,
              batches: list[tuple[torch.Tensor, torch.Tensor]], part: slice, device: torch.device
              ) -> list[float]:
    """Algorithm 1: per batch a student step on this rank's rows, then a discriminator step."""
    losses = []
    for x, y in batches:
        xb, yb = x[part].to(device), y[part].to(device)
        terms = igm(call, xb, yb)
        loss = terms["loss"]
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        igm.discriminator_step(terms, d_opt)
        losses.append(float(loss.detach()))
    return losses


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def in_sync(t: torch.Tensor, device: torch.device) -> bool:
    """The same vector on every rank (bit for bit)."""
    if tdist.get_world_size() == 1:
        return True
    lo, hi = t.clone().to(device), t.clone().to(device)
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def check_mode(args: argparse.Namespace, mode: str, scheme: str, device: torch.device,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    per = args.batch // world
    part = slice(rank * per, (rank + 1) * per)
    t0 = time.perf_counter()
    student, igm, s_opt, d_opt = build(args, mode, scheme, device)
    s0, d0 = flat(student), flat(igm.discriminator)
    ref = copy.deepcopy((student, igm, s_opt, d_opt)) if world == 1 else None
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    igm.wrap_discriminator(lambda m: nn.parallel.DistributedDataParallel(m, device_ids=ids))
    losses = run_steps(ddp, igm, s_opt, d_opt, batches, part, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict[str, Any] = {"losses": losses, "seconds": round(time.perf_counter() - t0, 3)}
    s1, d1 = flat(student), flat(igm.discriminator)
    out["finite"] = all(math.isfinite(v) for v in losses) and bool(torch.isfinite(s1).all())
    out["student_updated"] = not torch.equal(s0, s1)
    out["discriminator_updated"] = not torch.equal(d0, d1)
    out["ranks_in_sync"] = in_sync(torch.cat([s1, d1]), device)
    ok = out["finite"] and out["student_updated"] and out["discriminator_updated"] and out["ranks_in_sync"]
    if ref is not None:  # one process: DDP must change nothing
        r_student, r_igm, r_sopt, r_dopt = ref
        ref_losses = run_steps(r_student, r_igm, r_sopt, r_dopt, batches, part, device)
        cos = float(F.cosine_similarity(s1 - s0, flat(r_student) - s0, dim=0))
        out.update(plain_losses=ref_losses, cos_update_vs_plain=cos,
                   max_abs_diff_vs_plain=float((s1 - flat(r_student)).abs().max()))
        ok = ok and cos >= 0.999
    out["ok"] = bool(ok)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    p.add_argument("--model", default="resnet20", help="student from the zoo (BatchNorm: buffers broadcast)")
    p.add_argument("--data", default="", help="folder with cifar10.npz (e.g. .gpu-data); else random images")
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=3, help="student steps per mode")
    p.add_argument("--tiny", action="store_true", help="width-4 networks (CPU smoke)")
    p.add_argument("--json", default="", help="rank 0 writes the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("ddp_smoke: start me under torchrun, e.g. `torchrun --standalone --nproc-per-node 1 "
              "benchmarks/ddp_smoke.py`.", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # deterministic kernels: the DDP step and the plain step must then agree to rounding. (The first H200
    # run, 2026-11-29, used cuDNN's default kernels: exact mode agreed at cosine 0.99985, but the finite-
    # difference modes, which divide rounding noise by the step h, only at 0.996 / 0.991.)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("ddp_smoke: no CUDA device: use --device cpu (gloo) or run on a GPU machine.",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    tdist.init_process_group(backend)
    try:
        world, rank = tdist.get_world_size(), tdist.get_rank()
        if args.batch % world:
            raise SystemExit(f"ddp_smoke: --batch {args.batch} must be a multiple of the {world} processes.")
        batches = load_batches(args.data, args.steps, args.batch)
        results: dict[str, Any] = {"backend": backend, "world_size": world, "model": args.model,
                                   "batch": args.batch, "steps": args.steps, "torch": torch.__version__,
                                   "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                   else "cpu", "modes": {}}
        if device.type == "cuda":
            v = torch.cuda.nccl.version()
            results["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        for mode, scheme in MODES:
            name = "exact" if mode == "exact" else f"fd-{scheme}"
            # as igam train: TF32 off for finite differences (float32 convolutions), torch's default else
            with _tf32(False if mode != "exact" and device.type == "cuda" else None):
                res = check_mode(args, mode, scheme, device, batches)
            results["modes"][name] = res
            if rank == 0:
                extra = (f", cos(update, plain) {res['cos_update_vs_plain']:.6f}"
                         if "cos_update_vs_plain" in res else "")
                print(f"ddp_smoke: {name}: {'ok' if res['ok'] else 'FAILED'}: losses "
                      + " ".join(f"{v:.4f}" for v in res["losses"]) + f"; ranks in sync "
                      f"{res['ranks_in_sync']}{extra} ({res['seconds']} s)", flush=True)
        results["ok"] = all(r["ok"] for r in results["modes"].values())
        if rank == 0 and args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        if rank == 0:
            print(f"ddp_smoke: {backend}, {world} process(es): {'passed' if results['ok'] else 'FAILED'}",
                  flush=True)
        return 0 if results["ok"] else 1
    finally:
        tdist.destroy_process_group()


class _tf32:
    """TF32 for cuDNN convolutions and CUDA matmuls inside the block (None: leave as is)."""

    def __init__(self, on: bool | None):
        self.on = on

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if self.on is not None:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


if __name__ == "__main__":
    sys.exit(main())
