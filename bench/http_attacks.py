"""HTTP attacks on the coordinator's API, measured on this tree and (with --ref) an older revision, side by
side in one run.

The victim is the coordinator's app under uvicorn in its own process (tests/coordinator/test_http_limits.py
run as a script: a real history of 8 sealed rounds with real checkpoint files, an admin token), started
from the tree being measured; the attacks run from this process:

    posts       4 concurrent POSTs to an admin route, no token, each claiming a 200 MB body and
                streaming it until the server answers: their statuses, the server's peak RSS growth
    chunked     1 POST with the right token and a chunked 200 MB body (no length): status, RSS growth
    names       GET /checkpoints/ with ², 20 digits, 5000 digits, Arabic-Indic zero (.safetensors)
    metrics     /metrics with 4 peers, parsed by prometheus_client: families, untyped, counters w/o _total
    errors      GET of an unknown path, DELETE of /api/summary: content type of the error

    python bench/http_attacks.py --ref ccc455c          # the API before the request gate, and now

Writes bench/results/http_attacks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
SERVER = Path("tests/coordinator/test_http_limits.py")
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests/coordinator")]
from test_http_limits import PEERS, TOKEN, _status, post  # noqa: E402 (the test's client and probes)

sys.path.insert(0, str(ROOT / "bench"))
from _revision import older_tree, print_side_by_side  # noqa: E402

NAMES = {
    "²": "%C2%B2.safetensors",
    "20 digits": "9" * 20 + ".safetensors",
    "5000 digits": "7" * 5000 + ".safetensors",
    "Arabic-Indic 0": "%D9%A0.safetensors",
}


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def start_victim(tree: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    """The app of `tree` over a seeded history in `tmp` (seeded by `tree`'s own conftest)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("", "tests", "tests/coordinator")),
    }
    seed = (
        "import sys; from pathlib import Path; from conftest import seed_history; "
        "from coordinator.history import History; h = History.open(sys.argv[1]); "
        "seed_history(h, Path(sys.argv[1]).parent); h.close()"
    )
    subprocess.run([sys.executable, "-c", seed, str(tmp / "history.sqlite")], env=env, check=True, cwd=tree)
    proc = subprocess.Popen(
        [sys.executable, str(tree / SERVER), str(tmp / "history.sqlite"), TOKEN],
        env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    return proc, int(proc.stdout.readline().split()[1])


def measure(tree: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="nord-bench-http-") as tmp:
        proc, port = start_victim(tree, Path(tmp))
        url = f"http://127.0.0.1:{port}"
        try:
            out = {"RSS before (MiB)": round(_status(proc.pid, "VmRSS") / 2**20)}
            base = _status(proc.pid, "VmRSS")
            answers: list[object] = []

            def attack() -> None:
                try:
                    answers.append(post(port, f"/api/admin/ban/{PEERS[0]}", {}, chunked=False)[0])
                except Exception as e:  # the old server may answer something that is not JSON
                    answers.append(type(e).__name__)

            threads = [threading.Thread(target=attack) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["4 posts, no token"] = sorted(map(str, answers))
            out["posts: peak RSS growth (MiB)"] = round((_status(proc.pid, "VmHWM") - base) / 2**20)
            try:
                status = post(
                    port, f"/api/admin/ban/{PEERS[0]}", {"Authorization": f"Bearer {TOKEN}"}, chunked=True
                )[0]
            except Exception as e:
                status = type(e).__name__
            out["chunked 200 MB, token"] = status
            out["after both: peak RSS growth (MiB)"] = round((_status(proc.pid, "VmHWM") - base) / 2**20)
            for label, name in NAMES.items():
                status, headers, _ = get(f"{url}/checkpoints/{name}")
                kind = headers.get("content-type", "").split(";")[0]
                served = f", round {headers['x-nord-round']} served" if "x-nord-round" in headers else ""
                out[f"/checkpoints/{label}"] = f"{status} {kind}{served}"
            families = list(text_string_to_metric_families(get(f"{url}/metrics")[2].decode()))
            out["/metrics families"] = len(families)
            out["/metrics untyped families"] = sum(f.type == "unknown" for f in families)
            out["counters without _total"] = sum(
                f.type == "counter" and not all(s.name.endswith("_total") for s in f.samples)
                for f in families
            )
            for label, path, method in (
                ("unknown path", "/nope", "GET"),
                ("DELETE", "/api/summary", "DELETE"),
            ):
                status, headers, _ = get(url + path, method)
                out[label] = f"{status} {headers.get('content-type', '').split(';')[0]}"
            return out
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", help="also measure this git revision (in a temporary worktree)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/http_attacks.json"))
    args = parser.parse_args()
    results = {}
    with older_tree(args.ref, carry=(SERVER,)) as old:  # the same server script, on the older API
        trees = {args.ref: old, "this tree": ROOT} if old else {"this tree": ROOT}
        for name, tree in trees.items():
            print(f"measuring {name} ...", flush=True)
            results[name] = measure(tree)
    print_side_by_side(results, 34, 44)
    record = {
        "command": "python bench/http_attacks.py" + (f" --ref {args.ref}" if args.ref else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
