"""Throughput of corpus preparation (ds_trainer/data/prepare/) with 1 and with 2 worker processes.

python benchmarks/prepare_throughput.py [--mb 110] [--workers 1,2] [--repeat 1] [--shard_tokens 10000000]

Builds a corpus of at least --mb MB in a temporary folder from the shared texts (../shared/data):
documents made of randomly chosen paragraphs of tinyshakespeare and the-verdict, each starting with its
own number so exact dedup keeps them all; 40% as one .txt file per document, 55% as .jsonl files of ~5 MB,
and 5% as one long .txt document (so its pieces are spread over the workers too). Then prepares it once
per worker count (and round, alternating the order), in the same run on the same files, and prints
tokens/s (wall clock of the whole preparation) for each, the medians and their ratio to the first count.
The outputs must be identical (checked by the shards' sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken_cache"))


def build_corpus(folder: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """(bytes, documents) written under `folder`."""
    paras = []
    for name in ("tinyshakespeare.txt", "the-verdict.txt"):
        text = (DATA / name).read_text(encoding="utf-8")
        paras += [p.strip() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    txt_dir, jsonl_dir = folder / "txt", folder / "jsonl"
    txt_dir.mkdir(parents=True)
    jsonl_dir.mkdir()
    written = docs = 0

    def document(n: int) -> str:
        k = rng.randint(3, 40)
        return f"Document {n}.\n\n" + "\n\n".join(rng.sample(paras, k)) + "\n"

    # 5%: one long document
    long_parts, size = [], 0
    while size < 0.05 * target:
        part = "\n\n".join(rng.sample(paras, 50))
        long_parts.append(part)
        size += len(part.encode())
    data = ("The long document.\n\n" + "\n\n".join(long_parts) + "\n").encode()
    (folder / "long.txt").write_bytes(data)
    written, docs = len(data), 1
    # 40%: one .txt file per document
    while written < 0.45 * target:
        data = document(docs).encode()
        sub = txt_dir / f"{docs // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{docs:07d}.txt").write_bytes(data)
        written += len(data)
        docs += 1
    # 55%: JSONL files of ~5 MB
    shard = 0
    while written < target:
        lines, size = [], 0
        while size < 5e6 and written + size < target:
            line = json.dumps({"text": document(docs), "id": docs}) + "\n"
            lines.append(line)
            size += len(line.encode())
            docs += 1
        (jsonl_dir / f"part{shard:04d}.jsonl").write_text("".join(lines))
        written += size
        shard += 1
    return written, docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=110.0, help="corpus size in MB (at least 100 for the goal)"
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    parser.add_argument("--shard_tokens", type=int, default=10_000_000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds, alternating the order; medians reported"
    )
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    # Imported (numpy, tiktoken; not torch) and the tokenizer loaded before any timing starts.
    from ds_trainer.data.prepare import prepare
    from ds_trainer.tokenizer import identity

    identity()
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as tmp:
        corpus = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        nbytes, ndocs = build_corpus(corpus, args.mb)
        print(
            f"corpus: {nbytes / 1e6:.1f} MB, {ndocs:,} documents, built in {time.perf_counter() - t0:.1f}s "
            f"(cpus: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        results: dict[int, list[float]] = {w: [] for w in counts}
        hashes = []
        for r in range(args.repeat):
            for w in counts if r % 2 == 0 else counts[::-1]:
                out = Path(tmp) / f"out_r{r}_w{w}"
                t0 = time.perf_counter()
                r0, c0 = (
                    resource.getrusage(resource.RUSAGE_SELF),
                    resource.getrusage(resource.RUSAGE_CHILDREN),
                )
                with open(os.devnull, "w") as quiet:
                    s = prepare(
                        [str(corpus)],
                        out,
                        workers=w,
                        progress=False,
                        shard_tokens=args.shard_tokens,
                        out_stream=quiet,
                    )
                wall = time.perf_counter() - t0
                r1, c1 = (
                    resource.getrusage(resource.RUSAGE_SELF),
                    resource.getrusage(resource.RUSAGE_CHILDREN),
                )
                main_cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                worker_cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
                assert not s["already_prepared"]
                tokens = s["tokens"]["train"] + s["tokens"]["val"]
                results[w].append(tokens / wall)
                hashes.append([sh["sha256"] for sp in ("train", "val") for sh in s["metadata"][sp]["shards"]])
                print(
                    f"round {r + 1} workers {w}: {wall:6.1f}s  {tokens:,} tokens  {tokens / wall:,.0f} tokens/s  "
                    f"{nbytes / wall / 1e6:.2f} MB/s  | CPU: main {main_cpu:.1f}s, workers {worker_cpu:.1f}s  "
                    f"(load average now {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
                shutil.rmtree(out)
        median = {w: statistics.median(v) for w, v in results.items()}
        base = counts[0]
        for w in counts:
            print(
                f"workers {w}: median {median[w]:,.0f} tokens/s over {len(results[w])} run(s); "
                f"ratio to {base} worker(s): {median[w] / median[base]:.2f}x",
                flush=True,
            )
        same = all(h == hashes[0] for h in hashes)
        print(f"outputs identical across worker counts: {same}", flush=True)
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
