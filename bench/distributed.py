"""ProxSparse with FSDP2 on the CPU (gloo): one process against two, and a kill -9 mid-run.

    python bench/distributed.py                # SmolLM2-135M -> bench/results/distributed.md

1. The same learning run (global batch 2, micro-batches of 1 window, fixed seed) in one
   process and in two (``torchrun --nproc-per-node 2``, 1 thread each): are the masks
   identical; each rank's learning state (weights, gradients, AdamW) and peak memory.
2. ``proxsparse prune`` under torchrun, with rank 1 killed (SIGKILL) from outside once the
   first checkpoint exists; then the same command with ``--resume``. Its exported masks are
   compared with those of the same command run without interruption, and ``verify`` checks
   the export.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "distributed"
LEARN = dict(steps=6, batch_size=2, micro_batch_size=1, seed=0, checkpoint_every=2)
CALIB = dict(windows=8, seqlen=128)


def learn_row(model_spec: str, out: str) -> None:
    """One rank of run 1: learn, then save masks and measurements (``out``.rankR)."""
    import torch

    import proxsparse as ps
    from proxsparse.learning.distributed import local
    from proxsparse.methods import proxsparse as method

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    counted = {}
    real_finish = method.ProxSparseLearning.finish

    def finish_and_count(self):
        weights = sum(local(p).numel() * local(p).element_size() for p in self.trainable)
        states = sum(local(v).numel() * local(v).element_size()
                     for s in self.optimizer.state.values() for v in s.values() if v.dim())
        counted.update(weights=weights, gradients=weights, optimizer=states)
        return real_finish(self)

    method.ProxSparseLearning.finish = finish_and_count
    model, tokenizer = ps.load_model(model_spec, progress=False)
    calib = ps.calibration_windows(tokenizer, "builtin", CALIB["windows"], CALIB["seqlen"], 0)
    start = time.perf_counter()
    result = ps.prune(model, ps.ProxSparseConfig(**LEARN), calib, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"masks": result.masks, "state": counted, "peak": peak, "seconds": seconds},
               f"{out}.rank{rank}")


def torchrun(processes: int, *command: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(processes), *command]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def prune_command(model: str, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LEARN.items()]
    return torchrun(2, "-m", "proxsparse", "prune", "--model", model, "--method", "proxsparse",
                    "--calib-windows", str(CALIB["windows"]), "--seqlen", str(CALIB["seqlen"]),
                    "--out", str(out), "--quiet", *flags, *extra)


def kill_rank_after_checkpoint(command: list[str], run_dir: Path) -> int:
    """Start ``command``; once its first checkpoint exists, SIGKILL the worker of rank 1."""
    launcher = subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    while not (run_dir / "checkpoint.pt").exists():
        if launcher.poll() is not None:
            raise RuntimeError("the run ended before its first checkpoint:\n"
                               + launcher.stderr.read()[-2000:])
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                             text=True).stdout.split()
    rank1 = [pid for pid in workers
             if b"RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes().replace(
                 b"LOCAL_RANK=1\x00", b"").replace(b"GROUP_RANK=1\x00", b"")]
    os.kill(int(rank1[0]), signal.SIGKILL)
    launcher.wait()
    return launcher.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        learn_row(args.model, args.row)
        return
    import torch

    from proxsparse.export import load_masks

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--model", args.model]
    subprocess.run([sys.executable, *me, "--row", str(WORK / "one")], env=env(), check=True)
    subprocess.run(torchrun(2, *me, "--row", str(WORK / "two")), env=env(), check=True)
    one = torch.load(WORK / "one.rank0")
    two = [torch.load(WORK / f"two.rank{r}") for r in range(2)]
    identical = all(torch.equal(one["masks"][k], t["masks"][k]) for t in two
                    for k in one["masks"])

    plain, killed = WORK / "plain", WORK / "killed"
    start = time.perf_counter()
    subprocess.run(prune_command(args.model, plain), env=env(), cwd=ROOT, check=True)
    plain_seconds = time.perf_counter() - start
    code = kill_rank_after_checkpoint(prune_command(args.model, killed),
                                      Path(f"{killed}.run"))
    checkpoint_step = torch.load(Path(f"{killed}.run") / "checkpoint.pt",
                                 weights_only=True)["step"]
    subprocess.run(prune_command(args.model, killed, "--resume"), env=env(), cwd=ROOT,
                   check=True)
    plain_masks, _ = load_masks(plain)
    resumed_masks, _ = load_masks(killed)
    resumed_same = all(torch.equal(plain_masks[k], resumed_masks[k]) for k in plain_masks)
    verify = subprocess.run([sys.executable, "-m", "proxsparse", "verify", str(killed)],
                            env=env(), capture_output=True, text=True)

    gb = 1e9
    lines = [
        "# ProxSparse with FSDP2 on the CPU (gloo)", "",
        f"`python bench/distributed.py --model {args.model}`, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; 1 torch thread per "
        f"process on this 2-core machine; {LEARN['steps']} steps, global batch "
        f"{LEARN['batch_size']} windows of {CALIB['seqlen']} tokens, micro-batches of 1, "
        "seed 0, float32.", "",
        "## One process against two", "",
        "| | processes | weights | gradients | AdamW states | learning state | peak RSS "
        "| learning time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in [("one process", one), ("two processes, rank 0", two[0]),
                      ("two processes, rank 1", two[1])]:
        s = row["state"]
        total = sum(s.values())
        lines.append(f"| {name} | {2 if 'two' in name else 1} | {s['weights'] / gb:.3f} GB "
                     f"| {s['gradients'] / gb:.3f} GB | {s['optimizer'] / gb:.3f} GB "
                     f"| {total / gb:.3f} GB | {row['peak'] / gb:.2f} GB "
                     f"| {row['seconds']:.0f} s |")
    ratio = sum(two[0]["state"].values()) / sum(one["state"].values())
    lines += [
        "", f"- Masks of the two runs: **{'identical' if identical else 'DIFFERENT'}** "
        f"(every target layer, bit for bit).",
        f"- Rank 0's learning state is {ratio:.3f}× the single process's. The peak RSS does not "
        "halve: every rank also holds the whole pretrained model in host memory (it is W0; "
        "the single process learns in place and copies only the target weights), and rank 0 "
        "gathers the whole learning state at each checkpoint (here every 2 steps).",
        "", "## kill -9 of one rank, then --resume", "",
        f"- Uninterrupted `proxsparse prune` under torchrun: {plain_seconds:.0f} s.",
        f"- Rank 1 killed once the first checkpoint existed: torchrun exited with code {code}; "
        f"the checkpoint was at step {checkpoint_step}.",
        f"- The same command with `--resume`: exported masks "
        f"**{'identical to' if resumed_same else 'DIFFERENT from'}** the uninterrupted run's.",
        f"- `proxsparse verify` on the resumed export: {verify.stdout.strip().splitlines()[-1]}",
        "", "Commands (2 processes):", "", "```",
        " ".join(prune_command(args.model, Path("OUT"))).replace(sys.executable, "python"),
        "```",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
