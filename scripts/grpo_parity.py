"""Reward curves of the FOLM trainer on a profile's materialised artefacts, to compare implementations or setups.

Runs `train_folm` from the profile's `folm_base` on the profile's training queries and reward (as the
`folm_checkpoint` asset does), for several seeds, and writes each seed's per-step history as JSON. Run it on two
commits and compare the curves:

    R4T_PROFILE=smoke python scripts/grpo_parity.py --catalog polyvore --regime oar --steps 30 \
        --seeds 0 1 2 --out parity.json

Under `accelerate launch --multi_gpu --num_processes N scripts/grpo_parity.py ...` it trains in N processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from r4t_pipeline import stack
from r4t_pipeline.folm.grpo import train_folm
from r4t_pipeline.records import RecordStore
from r4t_pipeline.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default="polyvore")
    parser.add_argument("--regime", default="oar", choices=["oar", "wscr"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_settings()
    store = RecordStore(settings.records_dir)
    base = stack.base_model(store.read(f"{args.catalog}/folm_base").path)
    corpus = store.read(f"{args.catalog}/broad_queries")
    index = store.read(f"{args.catalog}/embedding_index").for_regime(args.regime)
    rows = stack.folm_train_rows(settings, corpus.path, args.regime)
    scorer = stack.fanout_scorer(settings, args.regime, index)
    runs = {}
    main_process = int(os.environ.get("RANK", "0")) == 0
    for seed in args.seeds:
        config = settings.folm.train.model_copy(update={"steps": args.steps, "seed": seed,
                                                        "k": stack.reward_config(settings, args.regime).k,
                                                        "save_every": args.steps})
        began = time.perf_counter()
        work = args.out.with_name(f".{args.out.stem}-seed{seed}")  # one folder that every process shares
        result = train_folm(base, rows, scorer, config, work, resume=False)
        runs[seed] = {"seconds": time.perf_counter() - began, "history": result.history}
        if main_process:
            shutil.rmtree(work)
            print(f"seed {seed}: {time.perf_counter() - began:.0f} s, reward/total "
                  f"{[round(r['reward/total'], 3) for r in result.history]}", file=sys.stderr)
    if main_process:
        args.out.write_text(json.dumps({"profile": settings.profile, "catalog": args.catalog, "regime": args.regime,
                                        "train_queries": len(rows), "config": config.model_dump(),
                                        "processes": int(os.environ.get("WORLD_SIZE", "1")), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
