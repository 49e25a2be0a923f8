"""Speed benchmark of analysis.geometry (a benchmark, not a test).

TwoNN ID of two paired representations A and B plus their neighbourhood overlap, computed by

* midtune: ``knn`` once per representation (float32 products, on GPU when available), reused;
* scikit-learn: ``NearestNeighbors(algorithm="brute")`` on float64 (DADApy's engine), the same
  metric functions on its neighbours;
* DADApy itself, when ``--dadapy-python`` points at an interpreter that has it: run in a
  subprocess on the same data (saved to a temporary .npy), timing only its compute.

Prints seconds, ratios and each engine's metric values, and appends a dated section to
BENCHMARKS.md (``--no-record`` to skip)::

    python -m analysis.bench --dadapy-python /tmp/dadapy-env/bin/python
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.neighbors import NearestNeighbors

from analysis.geometry import Neighbours, knn, neighborhood_overlap, twonn
from midtune.machine import machine_info

# Runs inside the DADApy interpreter: its usual calls, neighbours computed once per representation.
DADAPY_SCRIPT = """
import json, sys, time
from importlib.metadata import version
import numpy as np
from dadapy import Data

a, b, k = np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
data_a, data_b = Data(a, maxk=k), Data(b, maxk=k)
id_a = data_a.compute_id_2NN()[0]
id_b = data_b.compute_id_2NN()[0]
overlap = data_a.return_data_overlap(dist_indices=data_b.dist_indices, k=k)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, id_a=float(id_a), id_b=float(id_b), overlap=float(overlap),
                      version=version("dadapy"))))
"""


def make_data(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired float32 representations of one 16-D latent: A linear in it, B nonlinear, both noisy."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 16), dtype=np.float32)
    a = latent @ rng.standard_normal((16, dim), dtype=np.float32) / 4
    a += 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    b = np.tanh(latent @ rng.standard_normal((16, dim), dtype=np.float32) / 4)
    b += 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    return a, b


def metrics(nb_a: Neighbours, nb_b: Neighbours, k: int) -> dict:
    return {"id_a": twonn(nb_a), "id_b": twonn(nb_b), "overlap": neighborhood_overlap(nb_a, nb_b, k=k)}


def run_midtune(a, b, k):
    start = time.perf_counter()
    result = metrics(knn(a, k), knn(b, k), k)
    return {"seconds": time.perf_counter() - start, **result}


def run_sklearn(a, b, k):
    def neighbours(x):
        dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x.astype(np.float64)).kneighbors()
        return Neighbours(dist, idx, k)

    start = time.perf_counter()
    result = metrics(neighbours(a), neighbours(b), k)
    return {"seconds": time.perf_counter() - start, **result}


def run_dadapy(python: str, a, b, k):
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / "a.npy"), str(Path(tmp) / "b.npy")]
        np.save(paths[0], a)
        np.save(paths[1], b)
        out = subprocess.run([python, "-c", DADAPY_SCRIPT, *paths, str(k)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"DADApy run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="points per representation")
    parser.add_argument("--dim", type=int, default=4096, help="features per representation")
    parser.add_argument("--k", type=int, default=30, help="neighbourhood size of the overlap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dadapy-python", help="python interpreter with dadapy installed")
    parser.add_argument("--record", default="BENCHMARKS.md", help="markdown file to append the results to")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    info = machine_info(torch_threads=torch.get_num_threads(), numpy=np.__version__, sklearn=sklearn.__version__)
    a, b = make_data(args.n, args.dim, args.seed)
    print(f"data: A, B = {args.n} x {args.dim} float32, k = {args.k}; machine: {info}", flush=True)

    results = {"midtune": run_midtune(a, b, args.k)}
    print(f"midtune done in {results['midtune']['seconds']:.1f} s", flush=True)
    results["scikit-learn (brute, float64)"] = run_sklearn(a, b, args.k)
    print(f"scikit-learn done in {results['scikit-learn (brute, float64)']['seconds']:.1f} s", flush=True)
    if args.dadapy_python:
        results["DADApy"] = run_dadapy(args.dadapy_python, a, b, args.k)
        info["dadapy"] = results["DADApy"]["version"]

    ours = results["midtune"]
    rows = [f"| engine | seconds | midtune / engine | TwoNN ID(A) | TwoNN ID(B) | overlap (k={args.k}) |"]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['seconds']:.2f} | {ours['seconds'] / r['seconds']:.2f} "
            f"| {r['id_a']:.6f} | {r['id_b']:.6f} | {r['overlap']:.6f} |"
        )
    agreement = {
        name: max(abs(r[key] - ours[key]) / abs(ours[key]) for key in ("id_a", "id_b", "overlap"))
        for name, r in results.items()
        if name != "midtune"
    }
    agreement_line = "max relative difference of the metric values from midtune's: " + ", ".join(
        f"{name} {diff:.1e}" for name, diff in agreement.items()
    )
    table = "\n".join(rows)
    print(table)
    print(agreement_line)

    if args.no_record:
        return
    command = "python -m analysis.bench" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"""
## analysis.geometry: TwoNN + neighbourhood overlap, {when}

TwoNN ID of A and of B and their neighbourhood overlap (k = {args.k}), {args.n} x {args.dim} float32
points each (paired; `analysis.bench.make_data`, seed {args.seed}), neighbours computed once per
representation by each engine. Only compute is timed (DADApy in a subprocess, excluding loading).

- command: `{command}`
- machine: {info["cpu"]}, {info["cores"]} cores (torch threads {info["torch_threads"]}), GPU: {info["gpu"]},
  load average at start {info["load_average"]}
- versions: python {info["python"]}, torch {info["torch"]}, numpy {info["numpy"]}, scikit-learn {info["sklearn"]}"""
    if "dadapy" in info:
        section += f", dadapy {info['dadapy']} (separate environment, numpy<2)"
    section += f"\n\n{table}\n\n{agreement_line}\n"
    record = Path(args.record)
    if not record.exists():
        record.write_text("# Benchmarks\n")
    with record.open("a") as f:
        f.write(section)
    print(f"appended to {record}")


if __name__ == "__main__":
    main()
