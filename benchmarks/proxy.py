"""A worker's first read of a large study through the gRPC storage proxy: Optuna's proxy and
client beside ``qkv storage-proxy`` (:class:`FinishedTrialsKept`) and the workers' client
(:class:`DecodedOnceProxy`), side by side in one process on the same study.

Two proxies serve the same database storage (Optuna's cache of it) on two ports of
127.0.0.1, each read once to warm it. A round opens a fresh client of each kind, reads the
whole study through it as a worker that has just joined does, and times that read whole;
it also times the proxy's side alone (one ``GetTrials`` of every trial, no network) and the
client's alone (building the trials from the same reply's messages). Rounds are
interleaved; medians and the ratios are printed. The study is one that
``benchmarks/coordination.py`` filled (``--url`` and ``--study``), or a fresh SQLite one.

    python benchmarks/proxy.py --url postgresql+psycopg2://... --study coord-tiny-10000-grpc [--rounds 5]
    python benchmarks/proxy.py --trials 10000 [--root DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import coordination  # noqa: E402  (the fill, the machine's name, the code's commit, a free port)
import optuna  # noqa: E402
from optuna.storages._grpc import servicer as optuna_servicer  # noqa: E402
from optuna.storages._grpc.auto_generated import api_pb2  # noqa: E402
from optuna.storages._grpc.server import make_server as optuna_server  # noqa: E402

from qkvsearch.search.commands.proxy import FinishedTrialsKept, make_server  # noqa: E402
from qkvsearch.search.study.proxy_client import DecodedOnceProxy, trial_from_message  # noqa: E402
from qkvsearch.search.study.reader import Decoder  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "proxy.jsonl"


def timed_s(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def full_read(client_class, port: int, name: str) -> int:
    client = client_class(host="127.0.0.1", port=port)
    try:
        return len(client.get_all_trials(client.get_study_id_from_name(name), deepcopy=False))
    finally:
        client.close()


def optunas_build(messages) -> list[optuna.trial.FrozenTrial]:
    return [optuna_servicer._from_proto_trial(m) for m in messages]


def our_build(messages) -> list[optuna.trial.FrozenTrial]:
    decoder = Decoder()  # one per read, as DecodedOnceCache makes it
    return [trial_from_message(m, decoder) for m in messages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    coordination.study_arguments(parser, rounds=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = coordination.study_of(args, prefix="qkv-proxy-")
    storage = optuna.storages.get_storage(optuna.storages.RDBStorage(url, skip_compatibility_check=True))
    study_id = storage.get_study_id_from_name(name)
    theirs_port, ours_port = coordination.free_port(), coordination.free_port()
    servers = [optuna_server(storage, "127.0.0.1", theirs_port), make_server(storage, "127.0.0.1", ours_port, 10)[0]]
    for server in servers:
        server.start()
    theirs_servicer, ours_servicer = optuna_servicer.OptunaStorageProxyService(storage), FinishedTrialsKept(storage)
    everything = api_pb2.GetTrialsRequest(study_id=study_id, trial_id_greater_than=-1)
    try:
        n = full_read(optuna.storages.GrpcStorageProxy, theirs_port, name)  # warms the storage's cache
        assert full_read(DecodedOnceProxy, ours_port, name) == n  # and builds the kept messages once
        ours_servicer.GetTrials(everything, None)
        seen: dict[str, list[float]] = {key: [] for key in (
            "read, Optuna's", "read, ours", "proxy, Optuna's", "proxy, ours", "client, Optuna's", "client, ours")}
        for _ in range(args.rounds):
            seen["read, Optuna's"].append(timed_s(full_read, optuna.storages.GrpcStorageProxy, theirs_port, name)[0])
            seen["read, ours"].append(timed_s(full_read, DecodedOnceProxy, ours_port, name)[0])
            took, reply = timed_s(theirs_servicer.GetTrials, everything, None)
            seen["proxy, Optuna's"].append(took)
            seen["proxy, ours"].append(timed_s(ours_servicer.GetTrials, everything, None)[0])
            messages = api_pb2.GetTrialsReply.FromString(reply.SerializeToString()).trials
            seen["client, Optuna's"].append(timed_s(optunas_build, messages)[0])
            seen["client, ours"].append(timed_s(our_build, messages)[0])
    finally:
        for server in servers:
            server.stop(grace=None)
    median = {key: statistics.median(values) for key, values in seen.items()}
    print(f"proxy: {coordination.machine()}; {url.split(':', 1)[0]}, {n} trials, {args.rounds} rounds, "
          f"code {coordination.code()}")
    for part in ("read", "proxy", "client"):
        theirs, ours = median[f"{part}, Optuna's"], median[f"{part}, ours"]
        print(f"  {part:7} Optuna's {theirs:7.3f} s   ours {ours:7.3f} s   Optuna's/ours {theirs / ours:5.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps({"date": datetime.date.today().isoformat(), "machine": coordination.machine(),
                              "code": coordination.code(), "storage": url.split(":", 1)[0], "trials": n,
                              "rounds": args.rounds,
                              **{key.replace(", ", "_").replace("'s", "") + "_s": round(value, 4)
                                 for key, value in median.items()}}) + "\n")


if __name__ == "__main__":
    main()
