"""A model's served policy end to end: every labelled photo of some folders through a real
server's /v1 with no ``views`` (the model's ``auto`` policy, its gate and any cascade as
served), one photo at a time; top-1, view-equivalents, the share of photos a later model
answered and ms per photo, per folder, and the server's resident memory.

    PYTHONPATH=. .venv/bin/python -m studies.served_policy --models-dir models \\
        ../shared/data/imagenet-samples ../shared/data/imagenet-samples-extra \\
        ../shared/data/imagenet-compatible-500

Run it twice, on a repository before and after a policy change, to compare them on the
server's own code path (docs/policies.md, "Served end to end").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from app.jobs.datasets import read_labelled_folder
from app.labels import imagenet_1k
from app.serve_process import serve_process


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+", help="labelled photo folders")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="tf_efficientnet_lite0")
    args = p.parse_args()
    out: dict[str, object] = {}
    with serve_process(args.models_dir, args.model, ready_timeout_s=600) as (base, proc):
        out["resident_mb_ready"] = round(resident_mb(proc.pid), 1)
        client = httpx.Client(base_url=base, timeout=60)
        url = f"/v1/models/{args.model}/classify"
        for folder in args.folders:
            items = read_labelled_folder(folder, imagenet_1k()).items
            right = later = 0
            compute = 0.0
            t0 = time.perf_counter()
            for item in items:
                files = {"images": (item.path.name, item.path.read_bytes())}
                result = client.post(url, files=files).json()["results"][0]
                right += result["top"][0]["index"] == item.target
                compute += result["view_equivalents"]
                later += result["answered_by"] != [args.model]
            n = max(len(items), 1)
            out[folder.name] = {
                "photos": len(items), "right": right, "top1": round(right / n, 4),
                "view_equivalents": round(compute / n, 3), "later_share": round(later / n, 3),
                "ms_per_photo_c1": round(1000 * (time.perf_counter() - t0) / n, 1),
            }  # fmt: skip
            print(folder.name, out[folder.name], flush=True)
        out["resident_mb_after"] = round(resident_mb(proc.pid), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
