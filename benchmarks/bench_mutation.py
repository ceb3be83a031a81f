"""Mutation score of latentdiff's core modules: mutmut over the fast tests, with every surviving mutant listed.

    python benchmarks/bench_mutation.py [--modules latentdiff/guidance.py latentdiff/schedulers ...] [--label before]
                                        [--rerun-survivors] [--max-children 1] [--nice 10] [--out benchmarks/results]

What is mutated and which tests run come from `[tool.mutmut]` in pyproject.toml (the core modules, the fast tests);
`--modules` narrows the run to some of them. mutmut copies the package into ./mutants (gitignored), runs the
selected tests once to learn which tests reach which function, then, for every mutant, forks a process that runs
those tests with that one mutation switched on: a failing test kills it, a test run past its time limit counts as a
timeout (detected), a mutant no failing test notices survives. score = (killed + timeout) / mutants.

A plain run starts from an empty ./mutants (mutmut keeps verdicts across runs, and a cached "survived" would hide a
test added since). `--rerun-survivors` keeps ./mutants and retests only the mutants not detected last time: adding
tests cannot revive a killed mutant, and mutmut regenerates and retests the mutants of any function whose code changed.

Writes `OUT/mutation.json` (per module: mutants, killed, survived, timeout, no tests, score; total; runtime; versions;
one entry per `--label`, earlier labels kept) and `OUT/mutation.md` (score table, before/after columns, and every
surviving mutant with its line, the mutation and the "why equivalent" note kept in benchmarks/mutation_equivalent.json,
keyed by mutant name; a note whose recorded mutation no longer matches the mutant is shown as stale).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import fnmatch
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.json"
DETECTED = ("killed", "timeout", "segfault")  # segfault: the mutant crashed the test process (mutmut's name for it)
COLUMNS = ("killed", "timeout", "survived", "no tests", "other")


def mutmut_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def core_modules(cfg: dict) -> list[str]:
    """Every .py file under source_paths that only_mutate selects, as repo-relative paths."""
    files = [str(p.relative_to(ROOT)) for src in cfg["source_paths"] for p in sorted((ROOT / src).rglob("*.py"))]
    return [f for f in files if any(fnmatch.fnmatch(f, pat) for pat in cfg.get("only_mutate", ["*"]))]


def select(modules: list[str], wanted: list[str] | None) -> list[str]:
    if not wanted:
        return modules
    chosen = []
    for w in wanted:
        w = w.rstrip("/")
        hits = [m for m in modules if m == w or m.startswith(w + "/")]
        if not hits:
            raise SystemExit(f"--modules {w}: not among the mutated modules ([tool.mutmut] only_mutate in pyproject.toml)")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def module_name(path: str) -> str:
    name = path[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def load_results(path: str) -> dict[str, int | None]:
    meta = ROOT / "mutants" / (path + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def status_of(code) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def run_mutmut(names: list[str], args, log) -> float:
    """One `mutmut run` (all mutants of [tool.mutmut] when `names` is empty); returns its wall seconds."""
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    res = subprocess.run([str(exe), "run", "--max-children", str(args.max_children), *names], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(args.nice))
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"mutmut run exited with {res.returncode}; its output is in {log.name}")
    return wall


def undetected(modules: list[str]) -> list[str]:
    return [k for m in modules for k, code in load_results(m).items() if status_of(code) not in DETECTED]


def not_mutated(path: str) -> list[str]:
    """Functions mutmut 3 leaves alone: decorated ones (other than @staticmethod/@classmethod); module-level code."""
    tree = ast.parse((ROOT / path).read_text())
    out, has_function = [], False

    def visit(body, prefix=""):
        nonlocal has_function
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                has_function = True
                decos = [ast.unparse(d) for d in node.decorator_list]
                if decos and not (len(decos) == 1 and decos[0] in ("staticmethod", "classmethod")):
                    out.append(f"{prefix}{node.name} (@{', @'.join(decos)})")

    visit(tree.body)
    if not has_function:
        out.append("module-level definitions only (no function to mutate)")
    return out


def mutation_of(name: str, path: str) -> tuple[int | None, str, str]:
    """(line in the source file, original line, mutated line) of one mutant, from mutmut's own diff."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    old = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    new = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    old_s, new_s = " ".join(x.strip() for x in old), " ".join(x.strip() for x in new)
    lineno = None
    if old:
        from mutmut.utils.format_utils import orig_function_and_class_names_from_key

        func, cls = orig_function_and_class_names_from_key(name)
        source = (ROOT / path).read_text()
        body = ast.parse(source).body
        if cls:
            body = next(n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls)
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func)
        lines = source.splitlines()
        lineno = next((i + 1 for i in range(node.lineno - 1, node.end_lineno) if lines[i].strip() == old[0].strip()), None)
    return lineno, old_s, new_s


def summarize(modules: list[str], equivalent: dict) -> tuple[dict, dict, list[dict]]:
    per_module, survivors = {}, []
    for path in modules:
        results = load_results(path)
        counts = dict.fromkeys(COLUMNS, 0)
        for name, code in sorted(results.items(), key=lambda kv: (kv[0].rsplit("__mutmut_", 1)[0], int(kv[0].rsplit("_", 1)[1]))):
            status = status_of(code)
            key = {"segfault": "killed"}.get(status, status)
            counts[key if key in counts else "other"] += 1
            if status in DETECTED:
                continue
            line, old, new = mutation_of(name, path)
            note = equivalent.get(name)
            why = None
            if note:
                why = note["why"] if note.get("mutation") == new else f"(stale note, recorded for `{note.get('mutation')}`) {note['why']}"
            survivors.append({"name": name, "module": path, "status": status, "line": line, "original": old,
                              "mutation": new, "why_equivalent": why})
        n = len(results)
        detected = counts["killed"] + counts["timeout"]
        eq = sum(1 for s in survivors if s["module"] == path and s["why_equivalent"] and not s["why_equivalent"].startswith("(stale"))
        per_module[path] = {"mutants": n, **{k.replace(" ", "_"): v for k, v in counts.items()},
                            "equivalent": eq, "score": round(detected / n, 4) if n else None,
                            "score_without_equivalent": round(detected / (n - eq), 4) if n - eq else None,
                            "not_mutated": not_mutated(path)}
    total = {k: sum(m[k] for m in per_module.values()) for k in ("mutants", "killed", "timeout", "survived", "no_tests", "other", "equivalent")}
    det = total["killed"] + total["timeout"]
    total["score"] = round(det / total["mutants"], 4) if total["mutants"] else None
    total["score_without_equivalent"] = round(det / (total["mutants"] - total["equivalent"]), 4) if total["mutants"] - total["equivalent"] else None
    return per_module, total, survivors


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def code(s: str) -> str:
    return "`" + s.replace("|", "\\|").replace("`", "'") + "`" if s else ""


def write_markdown(result: dict, label: str, out: Path) -> None:
    run = result["runs"][label]
    labels = list(result["runs"])
    lines = ["# Mutation testing (`bench_mutation.py`)", "",
             f"mutmut {result['versions']['mutmut']} over latentdiff's core modules ([tool.mutmut] in pyproject.toml), "
             f"tests: `{' '.join(result['config']['test_selection'])}`; {result['config']['max_children']} child process, "
             f"torch {result['versions']['torch']}, Python {result['versions']['python']}, {result['machine']['cpu_count']} CPUs. "
             "A mutant is detected when a test fails (killed) or runs past its time limit (timeout); "
             "score = detected / mutants, \"no tests\" = no selected test reaches the function.", ""]
    if len(labels) > 1:
        lines += ["## Score per module, " + " → ".join(labels), "",
                  "| module | " + " | ".join(f"{lb} mutants | {lb} score" for lb in labels) + " |",
                  "|---|" + "---:|---:|" * len(labels)]
        mods = list(dict.fromkeys(m for lb in labels for m in result["runs"][lb]["modules"]))
        for m in mods + ["total"]:
            cells = []
            for lb in labels:
                r = result["runs"][lb]["total"] if m == "total" else result["runs"][lb]["modules"].get(m)
                cells += [str(r["mutants"]), pct(r["score"])] if r else ["", ""]
            name = "**total**" if m == "total" else f"`{m}`"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Runs: " + "; ".join(f"{lb}: {result['runs'][lb]['date']}, commit {result['runs'][lb]['git_commit'][:8]}, "
                                           f"{result['runs'][lb]['mode']}, {result['runs'][lb]['runtime_s'] / 60:.1f} min"
                                           for lb in labels), ""]
    lines += [f"## {label}: {run['date']}, commit {run['git_commit'][:8]}, {run['mode']} run, "
              f"{run['runtime_s'] / 60:.1f} min", "",
              "| module | mutants | killed | timeout | survived | no tests | other | equivalent | score | score without equivalent |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in list(run["modules"].items()) + [("total", run["total"])]:
        name = "**total**" if m == "total" else f"`{m}`"
        lines.append(f"| {name} | {r['mutants']} | {r['killed']} | {r['timeout']} | {r['survived']} | {r['no_tests']} | "
                     f"{r['other']} | {r['equivalent']} | {pct(r['score'])} | {pct(r['score_without_equivalent'])} |")
    lines += ["", f"## Undetected mutants ({label}): {len(run['survivors'])}", ""]
    if run["survivors"]:
        lines += ["Survived, or no test reaches them. `mutmut show NAME` prints the full diff (after a run, from the "
                  "repository root); a note in the last column comes from benchmarks/mutation_equivalent.json.", "",
                  "| mutant | status | line | original → mutated | why equivalent |", "|---|---|---:|---|---|"]
        for s in run["survivors"]:
            lines.append(f"| `{s['name']}` | {s['status']} | {s['line'] or ''} | {code(s['original'])} → {code(s['mutation'])} | "
                         f"{(s['why_equivalent'] or '').replace('|', '/')} |")
    skipped = {m: r["not_mutated"] for m, r in run["modules"].items() if r["not_mutated"]}
    if skipped:
        lines += ["", "## Not mutated", "",
                  "mutmut 3 does not mutate decorated functions (only @staticmethod/@classmethod ones) nor module-level "
                  "code (constants, dataclass fields, registries), so these are not measured here:", ""]
        lines += [f"- `{m}`: " + "; ".join(v) for m, v in skipped.items()]
    (out / "mutation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", help="module files or folders (default: all of [tool.mutmut] only_mutate)")
    parser.add_argument("--label", default="latest", help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="keep ./mutants and retest only the mutants the last run did not detect")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (1 on a shared 2-core box)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the mutmut process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes ./mutants relative to the working directory
    cfg = mutmut_config()
    modules = select(core_modules(cfg), args.modules)
    globs = [f"{module_name(m)}.x*" for m in modules] if args.modules else []
    log_path = ROOT / "benchmarks" / "cache" / f"mutation-{args.label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"mutating {len(modules)} modules; mutmut output: {log_path}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "latentdiff", "tests"], capture_output=True, text=True, cwd=ROOT).stdout.strip())
    with open(log_path, "w") as log:
        if args.rerun_survivors:
            if not (ROOT / "mutants").is_dir():
                raise SystemExit("--rerun-survivors needs ./mutants from an earlier run")
            mode, runtime, names = "rerun of the undetected mutants", 0.0, undetected(modules)
            print(f"retesting {len(names)} undetected mutants", flush=True)
            if names:
                runtime += run_mutmut(names, args, log)
            unchecked = [k for m in modules for k, c in load_results(m).items() if c is None]  # functions changed since
            if unchecked:
                runtime += run_mutmut(unchecked, args, log)
        else:
            mode = "fresh"
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
            runtime = run_mutmut(globs, args, log)

    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    per_module, total, survivors = summarize(modules, equivalent)
    if total["mutants"] and not total["killed"]:
        raise SystemExit("no mutant was killed: the tests are not importing the mutated copy (check mutants/ and sys.path)")
    out_json = args.out / "mutation.json"
    result = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    result.update({
        "versions": {"mutmut": importlib.metadata.version("mutmut"), "torch": importlib.metadata.version("torch"),
                     "python": platform.python_version()},
        "config": {"source_paths": cfg["source_paths"], "only_mutate": cfg.get("only_mutate", []),
                   "test_selection": cfg.get("pytest_add_cli_args_test_selection", []),
                   "pytest_args": cfg.get("pytest_add_cli_args", []), "process_isolation": cfg.get("process_isolation", "fork"),
                   "max_children": args.max_children},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
    })
    result["runs"][args.label] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": commit + ("+dirty" if dirty else ""),
        "mode": mode, "runtime_s": round(runtime, 1), "modules": per_module, "total": total, "survivors": survivors}
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_markdown(result, args.label, args.out)
    print(f"{total['mutants']} mutants: {total['killed']} killed, {total['timeout']} timeout, {total['survived']} survived, "
          f"{total['no_tests']} no tests; score {pct(total['score'])} ({pct(total['score_without_equivalent'])} without the "
          f"{total['equivalent']} equivalent); {runtime / 60:.1f} min. Results: {args.out / 'mutation.md'}")


if __name__ == "__main__":
    main()
