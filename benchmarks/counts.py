"""What the slot lock's counts cost on a large study in a database: the whole study counted
(what every look did until stop 31), a worker's first look of its :class:`DatabaseTally`,
and a steady look once the finished prefix is settled, side by side on the same study.

Each round adds one trial (taken and finished, as a worker does) so a steady look has a
change to read, then times the three, interleaved; medians over the rounds are printed with
their ratios. The study is one that ``benchmarks/coordination.py`` filled (``--url`` and
``--study``), or a fresh SQLite one filled here.

    python benchmarks/counts.py --url sqlite:///runs/studies.db --study coord-tiny-10000 [--rounds 21]
    python benchmarks/counts.py --trials 10000 [--root DIR]
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

import coordination  # noqa: E402  (the fill and the machine's name)
import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
from optuna.storages._rdb import models  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from qkvsearch.search.base.keys import BASELINE, FINALIST_OF  # noqa: E402
from qkvsearch.search.study.tally import COMMIT_HORIZON_S, DatabaseTally  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "counts.jsonl"


def whole_study(database: optuna.storages.RDBStorage, study_id: int) -> int:
    """The count as every look made it before the tally: each query over the whole study."""
    trials, user, system = models.TrialModel, models.TrialUserAttributeModel, models.TrialSystemAttributeModel
    with database.scoped_session() as session:
        by_state = dict(session.query(trials.state, sqlalchemy.func.count(trials.trial_id))
                        .filter(trials.study_id == study_id).group_by(trials.state).all())
        marked = {n for (n,) in session.query(trials.number).join(user, user.trial_id == trials.trial_id)
                  .filter(trials.study_id == study_id, user.key.in_([FINALIST_OF, BASELINE]))}
        failed = {n for (n,) in session.query(trials.number)
                  .filter(trials.study_id == study_id, trials.state == TrialState.FAIL)}
        retried = {n for (v,) in session.query(system.value_json).join(trials, system.trial_id == trials.trial_id)
                   .filter(trials.study_id == study_id, system.key == "retry_history") for n in json.loads(v)}
    return sum(by_state.values()) - len(marked) - len((failed - marked) & retried)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return 1e3 * (time.perf_counter() - start), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    coordination.study_arguments(parser, rounds=21)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = coordination.study_of(args, prefix="qkv-counts-")
    database = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    study = optuna.load_study(study_name=name, storage=database)
    study_id = study._study_id
    clock = Clock()
    steady = DatabaseTally(study_id, clock)
    steady.update(database)
    clock.now += COMMIT_HORIZON_S  # every finished trial seen is settled from here on
    steady.update(database)
    seen: dict[str, list[float]] = {"whole study": [], "first look": [], "steady look": []}
    rows = []
    for _ in range(args.rounds):
        trial = study.ask()  # a change for the steady look: a trial taken, then finished
        study.tell(trial, state=TrialState.PRUNED)
        clock.now += 1.0
        whole_ms, whole = timed(whole_study, database, study_id)
        first_ms, first = timed(DatabaseTally(study_id, clock).update, database)
        steady_ms, counts = timed(steady.update, database)
        assert whole == first.counted == counts.counted, (whole, first, counts)
        seen["whole study"].append(whole_ms)
        seen["first look"].append(first_ms)
        seen["steady look"].append(steady_ms)
        rows.append(steady.rows_read)
    n = len(study.get_trials(deepcopy=False))
    median = {k: statistics.median(v) for k, v in seen.items()}
    print(f"counts: {coordination.machine()}; {url.split(':', 1)[0]}, {n} trials, {args.rounds} rounds")
    for key, value in median.items():
        print(f"  {key:12} {value:8.2f} ms   whole/this {median['whole study'] / value:6.1f}x")
    print(f"  rows a steady look read: median {statistics.median(rows):.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps({"date": datetime.date.today().isoformat(), "machine": coordination.machine(),
                              "storage": url.split(":", 1)[0], "trials": n, "rounds": args.rounds,
                              **{f"{k.replace(' ', '_')}_ms": round(v, 2) for k, v in median.items()},
                              "steady_rows_read": statistics.median(rows)}) + "\n")


if __name__ == "__main__":
    main()
