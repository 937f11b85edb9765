"""Do torchrun's restarts work across nodes? Two torchrun launchers on this machine act as two nodes (c10d
rendezvous, --max-restarts 1, gloo); each worker joins the process group, node 1's worker kills itself once,
and both nodes must restart, join again and finish. Tried with torch's default (one key-value store kept for
every rendezvous round) and with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per round). No project
code runs here: it measures torch itself, which is why train.py notes the variable at start.

    python experiments/torchrun_restarts.py --tries 4
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import HelpFormatter  # noqa: E402

WORKER = """
import datetime, os, signal, time
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
dist.barrier()
time.sleep(1)
if os.environ["GROUP_RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    os.kill(os.getpid(), signal.SIGKILL)  # the first try of node 1's worker dies
for _ in range(5):
    dist.barrier()
print("finished", flush=True)
"""


def try_once(worker: str, fresh_store: bool) -> bool:
    """Both nodes' launchers end with exit code 0 and both workers finished."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fresh_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "restarts", "--max-restarts", "1", worker]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    try:
        outputs = [n.communicate(timeout=120)[0] for n in nodes]
    except subprocess.TimeoutExpired:
        return False
    finally:
        for n in nodes:
            n.kill()
    return all(n.returncode == 0 for n in nodes) and sum(o.count("finished") for o in outputs) == 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--tries", type=int, default=4, help="restarts tried per store setting")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worker = os.path.join(tmp, "worker.py")
        with open(worker, "w") as f:
            f.write(WORKER)
        print("| store | restarts that worked |\n|---|---|")
        for fresh in (False, True):
            ok = sum(try_once(worker, fresh) for _ in range(a.tries))
            name = "a fresh one per round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)" if fresh else "shared (default)"
            print(f"| {name} | {ok} of {a.tries} |", flush=True)


if __name__ == "__main__":
    main()
